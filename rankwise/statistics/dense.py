"""Activation statistics of dense layers: ``Linear`` and ``Conv1d/2d/3d``.

For a layer ``y = W x + b`` (``W`` of shape ``(out, in, *kernel)``), one calibration pass
accumulates, in float64, the moments of its activation rows (``count n``, ``sum s = sum_t
x_t``, ``square_sum = sum_t |x_t|^2`` and ``outer S = sum_t x_t x_t^T``), where a row is one
channel vector: one sample of a ``Linear`` (all leading dimensions of an ``(N, T, D)`` input
pooled, padding positions of a token mask left out: :mod:`rankwise.masks`) or one spatial
position of a convolution. Memory is ``O(d^2)`` per layer whatever the
amount of data, and moments of shards of the data simply add up.

Convolutions get both sides' full moments. A ``Linear`` layer gets the full moments of its
output and only ``count``, ``sum`` and ``square_sum`` of its input: for ``y = W x + b`` the
output projection ``P P^T`` with ``P`` the top eigenvectors of ``W C_x W^T = C_y`` is the
best rank-``r`` approximation of the layer on the data (reduced-rank regression), and input
or both-sides projection at the same rank costs the same learnables, so they never win and
their ``n d_in^2`` statistics are not worth computing. The spectra are regularised as
:mod:`rankwise.statistics.spectra` describes, with ``d`` the largest analysed width
(``d_out`` for a ``Linear`` layer, ``max(d_in, d_out)`` for a convolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankwise.kinds import kind_named
from rankwise.masks import TokenMask, active_mask, token_rows
from rankwise.moments import Moments, Spectrum
from rankwise.statistics.spectra import shrinkage


@dataclass
class LayerStatistics:
    """What NeuronPCA knows about one dense layer: its shape, both sides' moments, weight Grams.

    ``weight_gram_input = sum_k W_k^T W_k`` (``in x in``, summed over kernel positions; ``None``
    for a ``Linear`` layer, whose input side is not analysed) lets the input side be judged in
    the output space, ``|W q|^2 = q^T weight_gram_input q``;
    ``weight_gram_output = W W^T`` (``out x out``, ``W`` as ``(out, in * kernel)``) is the
    output covariance that isotropic unit inputs would give, the regularisation's prior.
    """

    kind: str
    in_channels: int
    out_channels: int
    kernel_numel: int
    bias: bool
    input: Moments
    output: Moments
    weight_gram_input: torch.Tensor | None
    weight_gram_output: torch.Tensor

    @classmethod
    def for_layer(cls, layer: nn.Module, kind: str) -> "LayerStatistics":
        """Empty statistics of ``layer``, a row of :data:`rankwise.kinds.KINDS` called ``kind``."""
        w = kind_named(kind).weight(layer).detach()
        out_c, in_c = w.shape[:2]
        linear = "input" not in kind_named(kind).sides
        per_position = w.reshape(out_c, in_c, -1).permute(2, 0, 1)  # (kernel, out, in)
        gram_input = None if linear else torch.einsum("koi,koj->ij", per_position, per_position)
        gram_output = w.reshape(out_c, -1) @ w.reshape(out_c, -1).T
        return cls(kind, in_c, out_c, per_position.shape[0], layer.bias is not None,
                   Moments.zeros(in_c, w.device, outer=not linear), Moments.zeros(out_c, w.device),
                   None if linear else gram_input.to(torch.float64), gram_output.to(torch.float64))

    @property
    def width(self) -> int:
        """Largest dimension among the analysed sides (a Linear layer's input is not analysed)."""
        return self.out_channels if self.input.outer is None else max(self.in_channels, self.out_channels)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_channels, in_channels)``."""
        return self.out_channels, self.in_channels

    def moments(self, side: str) -> Moments:
        return self.input if side == "input" else self.output

    def spectra_keys(self) -> list[tuple[str, None]]:
        """``(side, cell)`` of every spectrum this layer has: its analysed sides, no cell."""
        return [(side, None) for side in kind_named(self.kind).sides]

    def resolve_request(self, name: str, side: str, cell) -> None:
        """``None``, the only cell; a ValueError unless layer ``name`` has a spectrum on ``side``."""
        if cell is not None:
            raise ValueError(f"cell: layer {name!r} is not recurrent; only LSTM and GRU layers "
                             "have cells.")
        if self.moments(side).outer is None:
            raise ValueError(f"side: layer {name!r} is a Linear layer, whose input side is not "
                             "analysed (output projection is optimal for it); use side='output'.")

    def spectrum(self, side: str, cell: None, regularization) -> Spectrum:
        """Principal components of ``side``: the eigen-decomposition of ``C_reg``.

        ``C_reg = (1 - alpha) C + alpha s P`` with ``s = tr(C_x) / d_in`` and the prior ``P = I``
        on the input side, ``P = W W^T`` on the output side (:mod:`rankwise.statistics.spectra`).
        """
        moments = self.moments(side)
        covariance = moments.covariance
        prior = (torch.eye(len(covariance), dtype=covariance.dtype, device=covariance.device)
                 if side == "input" else self.weight_gram_output)
        alpha = shrinkage(regularization, float(moments.count), self.width)
        return Spectrum.shrunk(covariance, moments.mean, alpha, self.input.power * prior)

    def hook(self, name: str, layer: nn.Module):
        """A forward hook (``with_kwargs=True``) adding one call of ``layer`` to these moments."""
        def update(side: str, t: torch.Tensor) -> None:
            self.moments(side).update_of(channel_rows(t.detach(), layer, active_mask()), name, f"{side} activations")

        def hook(module, args, kwargs, output):
            update("input", args[0] if args else next(iter(kwargs.values())))
            update("output", output)

        return hook

    def __add__(self, other: "LayerStatistics") -> "LayerStatistics":
        if self.shape != other.shape:
            raise ValueError("the two statistics describe layers of different shapes")
        return LayerStatistics(**{**vars(self), "input": self.input + other.input,
                                  "output": self.output + other.output})


def channel_rows(tensor: torch.Tensor, layer: nn.Module, mask: TokenMask | None = None) -> torch.Tensor:
    """``(rows, channels)``: the channel vectors of an activation (or gradient) of ``layer``.

    A ``Linear`` (2-d weight) has its channels last and every leading position is a row, but
    for the padding positions of ``mask`` (:func:`rankwise.masks.token_rows`); a convolution has
    them on axis 1 (axis 0 unbatched) and every spatial position is a row (a mask is not read).
    """
    if layer.weight.dim() == 2:
        return token_rows(tensor, mask).reshape(-1, tensor.shape[-1])
    channel_dim = 1 if tensor.dim() == layer.weight.dim() else 0  # batched or unbatched
    return tensor.movedim(channel_dim, -1).reshape(-1, tensor.shape[channel_dim])
