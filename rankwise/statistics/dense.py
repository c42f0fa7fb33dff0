"""Activation statistics of dense layers: ``Linear`` and ``Conv1d/2d/3d``.

For a layer ``y = W x + b`` (``W`` of shape ``(out, in, *kernel)``), one calibration pass
accumulates, in float64, the moments of its activation rows (``count n``, ``sum s = sum_t
x_t``, ``square_sum = sum_t |x_t|^2`` and ``outer S = sum_t x_t x_t^T``), where a row is one
channel vector: one sample of a ``Linear`` (all leading dimensions of an ``(N, T, D)`` input
pooled, padding positions of a token mask left out: :mod:`rankwise.masks`) or one spatial
position of a convolution. Memory is ``O(d^2)`` per layer whatever the
amount of data, and moments of shards of the data simply add up.

Convolutions get both sides' full moments. A ``Linear`` layer analyses its output only: for
``y = W x + b`` the output projection ``P P^T`` with ``P`` the top eigenvectors of
``W C_x W^T = C_y`` is the best rank-``r`` approximation of the layer on the data
(reduced-rank regression), and input or both-sides projection at the same rank costs the same
learnables, so they never win. Its output moments are exact functions of its input moments,

    count_y = n,   sum_y = W s + n b,   outer_y = W S W^T + (W s) b^T + b (W s)^T + n b b^T,
    square_sum_y = tr(outer_y),

so it gathers the Gram of its **smaller side only**: when ``d_in <= d_out`` the input's full
moments (``n d_in^2`` per pass instead of ``n d_out^2``), the output's being derived from them
in float64 when first asked for (after any merge or process-group sum, which add input
moments); otherwise the output's full moments and only ``count``, ``sum`` and ``square_sum`` of
its input, as before. Layers that read the same activation tensor in one forward call (the
query, key and value of an attention, a gated MLP's gate and up projections, a residual
block's first convolution and its shortcut) share one computation of that input's batch moments
(:class:`SharedInputs`). The spectra are regularised as :mod:`rankwise.statistics.spectra`
describes, with ``d`` the largest analysed width (``d_out`` for a ``Linear`` layer,
``max(d_in, d_out)`` for a convolution).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.kinds import kind_named
from rankwise.masks import TokenMask, active_mask, token_rows
from rankwise.moments import Moments, Spectrum, naming_layer
from rankwise.statistics.spectra import shrinkage


@dataclass
class LayerStatistics:
    """What NeuronPCA knows about one dense layer: its shape, both sides' moments, weight Grams.

    ``weight_gram_input = sum_k W_k^T W_k`` (``in x in``, summed over kernel positions; ``None``
    for a ``Linear`` layer, whose input side is not analysed) lets the input side be judged in
    the output space, ``|W q|^2 = q^T weight_gram_input q``;
    ``weight_gram_output = W W^T`` (``out x out``, ``W`` as ``(out, in * kernel)``) is the
    output covariance that isotropic unit inputs would give, the regularisation's prior.

    Both Grams and, for a ``Linear`` layer that gathered its input's Gram instead
    (``d_in <= d_out``), the output moments are computed when first needed, from
    ``weight_matrix`` ``W`` and ``bias_vector`` ``b`` (copies in the layer's dtype, kept until
    then): fresh statistics hold ``None`` for them, :meth:`moments` and :meth:`spectrum`
    compute what they use, and :meth:`settled` returns the statistics with everything filled
    in (``weight_matrix`` and ``bias_vector`` then ``None``), as :class:`~rankwise.NeuronPCA`
    hands them out.
    """

    kind: str
    in_channels: int
    out_channels: int
    kernel_numel: int
    bias: bool
    input: Moments
    output: Moments | None
    weight_gram_input: torch.Tensor | None
    weight_gram_output: torch.Tensor | None
    weight_matrix: torch.Tensor | None = None
    bias_vector: torch.Tensor | None = None

    @classmethod
    def for_layer(cls, layer: nn.Module, kind: str) -> "LayerStatistics":
        """Empty statistics of ``layer``, a row of :data:`rankwise.kinds.KINDS` called ``kind``."""
        w = kind_named(kind).weight(layer).detach()
        out_c, in_c = w.shape[:2]
        linear = "input" not in kind_named(kind).sides
        derives = linear and in_c <= out_c and _is_affine(layer, kind)
        bias = layer.bias.detach().clone() if derives and layer.bias is not None else None
        return cls(kind, in_c, out_c, w[0, 0].numel(), layer.bias is not None,
                   Moments.zeros(in_c, w.device, outer=derives or not linear),
                   None if derives else Moments.zeros(out_c, w.device), None, None, w.clone(), bias)

    def settled(self) -> "LayerStatistics":
        """These statistics with the weight Grams and derived output moments computed."""
        if self.weight_matrix is None:
            return self
        gram_input, gram_output = self._weight_grams()
        return dataclasses.replace(self, output=self.moments("output"), weight_gram_input=gram_input,
                                   weight_gram_output=gram_output, weight_matrix=None, bias_vector=None)

    def _weight_grams(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(sum_k W_k^T W_k or None for a Linear layer, W W^T)`` in float64 (products in the
        weight's dtype), the given ones when already computed."""
        if self.weight_matrix is None:
            return self.weight_gram_input, self.weight_gram_output
        w = self.weight_matrix
        out_c, in_c = w.shape[:2]
        per_position = w.reshape(out_c, in_c, -1).permute(2, 0, 1)  # (kernel, out, in)
        gram_input = (torch.einsum("koi,koj->ij", per_position, per_position).to(torch.float64)
                      if self._analyses_input else None)
        return gram_input, (w.reshape(out_c, -1) @ w.reshape(out_c, -1).T).to(torch.float64)

    @property
    def width(self) -> int:
        """Largest dimension among the analysed sides (a Linear layer's input is not analysed)."""
        return max(self.in_channels, self.out_channels) if self._analyses_input else self.out_channels

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_channels, in_channels)``."""
        return self.out_channels, self.in_channels

    def moments(self, side: str) -> Moments:
        """The moments of ``side``; a ``Linear`` layer's output moments derived from its input's
        (module docstring) when it gathered those."""
        if side == "input":
            return self.input
        return self.output if self.output is not None else self._derived_output()

    def _derived_output(self) -> Moments:
        """``(n, W s + n b, tr(outer_y), outer_y)`` with ``outer_y = W S W^T + (W s) b^T + b (W s)^T
        + n b b^T``, in float64, from the input moments ``(n, s, S)``."""
        weight = self.weight_matrix.to(torch.float64)
        image = weight @ self.input.sum
        outer = weight @ self.input.outer @ weight.T
        total = image
        if self.bias_vector is not None:
            b = self.bias_vector.to(torch.float64)
            cross = torch.outer(image, b)
            outer = outer + cross + cross.T + self.input.count * torch.outer(b, b)
            total = image + self.input.count * b
        return Moments(self.input.count.clone(), total, outer.trace(), outer)

    @property
    def _analyses_input(self) -> bool:
        return "input" in kind_named(self.kind).sides

    def spectra_keys(self) -> list[tuple[str, None]]:
        """``(side, cell)`` of every spectrum this layer has: its analysed sides, no cell."""
        return [(side, None) for side in kind_named(self.kind).sides]

    def resolve_request(self, name: str, side: str, cell) -> None:
        """``None``, the only cell; a ValueError unless layer ``name`` has a spectrum on ``side``."""
        if cell is not None:
            raise ValueError(f"cell: layer {name!r} is not recurrent; only LSTM and GRU layers "
                             "have cells.")
        if side == "input" and not self._analyses_input:
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
                 if side == "input" else self._weight_grams()[1])
        alpha = shrinkage(regularization, float(moments.count), self.width)
        return Spectrum.shrunk(covariance, moments.mean, alpha, self.input.power * prior)

    def hook(self, name: str, layer: nn.Module):
        """A forward hook (``with_kwargs=True``) adding one call of ``layer`` to these moments.

        The input's batch moments come from the :class:`SharedInputs` of the enclosing
        :func:`sharing_inputs` block, when there is one; the output is not read when its
        moments are derived.
        """
        def update(moments: Moments, t: torch.Tensor, side: str, shared: bool) -> None:
            with naming_layer(name, f"{side} activations"):
                moments.add_(_batch_moments(t.detach(), layer, moments.outer is not None, shared))

        def hook(module, args, kwargs, output):
            update(self.input, args[0] if args else next(iter(kwargs.values())), "input", True)
            if self.output is not None:
                update(self.output, output, "output", False)

        return hook

    def __add__(self, other: "LayerStatistics") -> "LayerStatistics":
        """Statistics of both calibration sets; the output moments stay derived when both derive them."""
        if self.shape != other.shape:
            raise ValueError("the two statistics describe layers of different shapes")
        both_derive = self.output is None and other.output is None
        output = None if both_derive else self.moments("output") + other.moments("output")
        return dataclasses.replace(self, input=self.input + other.input, output=output)


def settled(stats):
    """``stats`` with what a dense layer computes on first use filled in
    (:meth:`LayerStatistics.settled`); any other statistics as they are."""
    return stats.settled() if isinstance(stats, LayerStatistics) else stats


class SharedInputs:
    """The batch moments of the last few input tensors seen, for the next layers that read them.

    Keyed by the tensor's ``data_ptr``, shape, strides, dtype, device and ``_version`` (bumped by
    every in-place change), and by the row layout (``Linear`` or convolution) and whether an
    ``outer`` is tracked. Each entry keeps its tensor alive, so its memory cannot be reused by
    another tensor while the entry exists; :meth:`clear` empties it (once per batch).

    Attributes
    ----------
    computed : int
        How many batch moments were computed (the others were reused).
    """

    SIZE = 4
    """Entries kept: enough for siblings that are not called one right after the other (a
    residual block's shortcut reads the block's input after its first two convolutions)."""

    def __init__(self):
        self._entries: dict = {}
        self.computed = 0

    def moments(self, tensor: torch.Tensor, layout: tuple, compute) -> Moments:
        """The moments ``compute()`` gives for ``tensor``, computed once per tensor and ``layout``."""
        if tensor.is_inference():  # inference tensors have no version counter: never shared
            self.computed += 1
            return compute()
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype,
               tensor.device, tensor._version, layout)
        if key not in self._entries:
            self.computed += 1
            if len(self._entries) >= self.SIZE:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = (tensor, compute())
        return self._entries[key][1]

    def clear(self) -> None:
        """Forget every entry (and release the tensors it kept)."""
        self._entries.clear()


_SHARED: contextvars.ContextVar[SharedInputs | None] = contextvars.ContextVar("shared_inputs", default=None)


@contextlib.contextmanager
def sharing_inputs():
    """Context manager: inside it, the dense hooks share input batch moments through the
    :class:`SharedInputs` it yields (call its ``clear()`` between batches)."""
    shared = SharedInputs()
    token = _SHARED.set(shared)
    try:
        yield shared
    finally:
        _SHARED.reset(token)
        shared.clear()


def _batch_moments(tensor: torch.Tensor, layer: nn.Module, outer: bool, shared: bool) -> Moments:
    """The moments of one call's activation ``tensor`` of ``layer``, through the current
    :class:`SharedInputs` when ``shared`` and one is active."""
    def compute() -> Moments:
        if layer.weight.dim() == 2:
            return Moments.of_rows(channel_rows(tensor, layer, active_mask()), outer)
        channels = tensor if tensor.dim() == layer.weight.dim() else tensor[None]  # batched or not
        return Moments.of_channels(channels.reshape(*channels.shape[:2], -1), outer)

    cache = _SHARED.get() if shared else None
    if cache is None:
        return compute()
    return cache.moments(tensor, (layer.weight.dim() == 2, outer), compute)


def _is_affine(layer: nn.Module, kind: str) -> bool:
    """Whether ``layer`` computes ``W x + b`` with its kind's own ``forward`` (a subclass that
    overrides it may compute anything, so its output moments are gathered, not derived)."""
    return any(type(layer).forward is t.forward for t in kind_named(kind).classes())


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
