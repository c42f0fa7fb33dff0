"""Statistics of an ``nn.MultiheadAttention``: its key, value and output projections.

An ``nn.MultiheadAttention`` of width ``E`` holds four ``Linear`` maps, which it applies
itself (``F.multi_head_attention_forward``), so they are observed through the attention
module's own calls:

- the *parts* ``key`` and ``value``: ``k = W_k x_k + b_k`` (``W_k``: ``E x kdim``) on the key
  input ``x_k`` and ``v = W_v x_v + b_v`` on the value input. A forward hook (with keyword
  arguments) sees ``x_k`` and ``x_v``; their streaming moments (``mu_x``, ``C_x``) give those of
  the projections exactly, ``mu_k = W_k mu_x + b_k`` and ``C_k = W_k C_x W_k^T``. When the key is
  the value (self-attention), one Gram of the input serves both;
- the part ``out``: ``y = W_o z + b_o``, whose output ``y`` is the attention's output, seen by
  the same hook; its moments are gathered directly;
- the query projection is not analysed (see :mod:`rankwise.layers.attention`).

Rows are token positions (batch and sequence pooled, ``batch_first`` either way). Positions
that ``key_padding_mask`` marks as padding (``True``, or ``-inf`` in a float mask) enter no
statistic of the key and value, nor, in self-attention (the query is the key), of the output;
a call without one honours the active token mask (:mod:`rankwise.masks`) where it fits.

Each part's spectrum is regularised as :mod:`rankwise.statistics.spectra` describes, toward
``s W W^T`` (the output covariance of isotropic inputs), with ``s`` the input's mean variance
per channel for the key and value, and ``s = tr(C_y) / tr(W_o W_o^T)`` for the output, whose
input the attention never exposes; ``d`` is the part's width ``E``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankwise.layers.attention import PARTS, part_weights
from rankwise.masks import active_mask, token_rows
from rankwise.moments import Moments, Spectrum, naming_layer
from rankwise.statistics.spectra import shrinkage

CALL_ARGUMENTS = ("query", "key", "value", "key_padding_mask")
"""The leading arguments of ``nn.MultiheadAttention.forward``, in order."""


@dataclass
class AttentionStatistics:
    """What NeuronPCA knows about one ``nn.MultiheadAttention`` (see the module docstring).

    ``key`` and ``value`` are the moments of the key and value inputs (``kdim``, ``vdim``),
    ``output`` those of the attention's output (``E``); ``weights`` and ``biases`` hold, in
    float64, ``W_k``, ``W_v``, ``W_o`` and ``b_k``, ``b_v``, ``b_o``.
    """

    kind: str
    embed_dim: int
    num_heads: int
    kdim: int
    vdim: int
    key: Moments
    value: Moments
    output: Moments
    weights: list
    biases: list

    @classmethod
    def for_layer(cls, layer: nn.MultiheadAttention, kind: str) -> "AttentionStatistics":
        """Empty statistics of ``layer``, a row of :data:`rankwise.kinds.KINDS` called ``kind``."""
        weights, biases = zip(*(part_weights(layer, part) for part in PARTS))
        device = layer.out_proj.weight.device
        return cls(kind, layer.embed_dim, layer.num_heads, layer.kdim, layer.vdim,
                   Moments.zeros(layer.kdim, device), Moments.zeros(layer.vdim, device),
                   Moments.zeros(layer.embed_dim, device),
                   [w.detach().to(torch.float64) for w in weights], [b.detach().to(torch.float64) for b in biases])

    @property
    def cells(self) -> tuple[str, ...]:
        """The analysed parts, :data:`PARTS`."""
        return PARTS

    @property
    def input(self) -> Moments:
        """The key input's moments (their ``count`` is the observations seen)."""
        return self.key

    @property
    def width(self) -> int:
        return max(self.embed_dim, self.kdim, self.vdim)

    @property
    def shape(self) -> tuple:
        """``(kind, E, heads, kdim, vdim)``, as :meth:`rankwise.kinds.LayerKind.statistics_shape`."""
        return self.kind, self.embed_dim, self.num_heads, self.kdim, self.vdim

    def spectra_keys(self) -> list[tuple[str, str]]:
        """``("output", part)`` for every part."""
        return [("output", part) for part in PARTS]

    def resolve_request(self, name: str, side: str, cell) -> str:
        """The part ``cell`` names; a ValueError for another side or an unknown part."""
        if side != "output" or cell not in PARTS:
            raise ValueError(f"cell: layer {name!r} is an attention layer; ask for side='output' of "
                             f"one of its parts {', '.join(map(repr, PARTS))} (got side={side!r}, "
                             f"cell={cell!r}).")
        return cell

    def part_moments(self, part: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(mu, C, n)`` of a part's output: from the input's moments for the key and value
        (``W mu_x + b``, ``W C_x W^T``), observed for the output."""
        if part == "out":
            return self.output.mean, self.output.covariance, float(self.output.count)
        index = PARTS.index(part)
        weight, bias, moments = self.weights[index], self.biases[index], getattr(self, part)
        covariance = weight @ moments.covariance @ weight.T
        return weight @ moments.mean + bias, (covariance + covariance.T) / 2, float(moments.count)

    def spectrum(self, side: str, cell: str, regularization) -> Spectrum:
        """Principal components of part ``cell``'s output, regularised toward ``s W W^T``."""
        mean, covariance, count = self.part_moments(cell)
        weight = self.weights[PARTS.index(cell)]
        gram = weight @ weight.T
        scale = (covariance.trace() / gram.trace() if cell == "out"
                 else getattr(self, cell).power) if gram.trace() > 0 else 0.0
        alpha = shrinkage(regularization, count, self.embed_dim)
        return Spectrum.shrunk(covariance, mean, alpha, scale * gram)

    def hook(self, name: str, layer: nn.MultiheadAttention):
        """A forward hook (``with_kwargs=True``) adding one call's key, value and output rows."""
        def hook(module, args, kwargs, output):
            call = dict(zip(CALL_ARGUMENTS, args)) | {k: v for k, v in kwargs.items() if k in CALL_ARGUMENTS}
            keep = _kept_positions(call.get("key_padding_mask"))
            with naming_layer(name, "key inputs"):
                key = Moments.of_rows(_rows(call["key"], keep, layer.batch_first))
            if call["value"] is call["key"]:
                value = key
            else:
                with naming_layer(name, "value inputs"):
                    value = Moments.of_rows(_rows(call["value"], keep, layer.batch_first))
            self.key.add_(key)
            self.value.add_(value)
            self_attention = call["query"] is call["key"]
            rows = _rows(output[0], keep if self_attention else None, layer.batch_first)
            self.output.update_of(rows, name, "output activations")

        return hook

    def __add__(self, other: "AttentionStatistics") -> "AttentionStatistics":
        if self.shape != other.shape:
            raise ValueError("the two statistics describe attention layers of different shapes")
        return AttentionStatistics(**{**vars(self), "key": self.key + other.key,
                                      "value": self.value + other.value, "output": self.output + other.output})


def _kept_positions(mask) -> torch.Tensor | None:
    """``(batch, length)`` (``(length,)`` unbatched) True where a key position is not padding."""
    if mask is None:
        return None
    padded = mask if mask.dtype == torch.bool else torch.isneginf(mask)
    return ~padded


def _rows(tensor: torch.Tensor, keep: torch.Tensor | None, batch_first: bool) -> torch.Tensor:
    """The channel rows of a ``(N, L, C)`` / ``(L, N, C)`` / ``(L, C)`` tensor: the positions
    ``keep`` holds, or without ``keep`` those of the active token mask
    (:func:`rankwise.masks.token_mask`) where it fits, else every position."""
    tensor = tensor.detach()
    if tensor.dim() == 3 and not batch_first:
        tensor = tensor.transpose(0, 1)
    if keep is None:
        return token_rows(tensor, active_mask()).reshape(-1, tensor.shape[-1])
    return tensor[keep]
