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
moments (``n d_in^2`` per pass instead of ``n d_out^2``; the output's derived in float64 only
when asked for, the decisions reading the factorisation instead: *factored* statistics);
otherwise the output's full moments and only ``count``, ``sum`` and ``square_sum`` of its
input. Layers that read the same activation tensor in one forward call (the query, key and value of an attention, a gated MLP's gate and up projections, a residual
block's first convolution and its shortcut) share one computation of that input's batch moments,
and the rows of ``Linear`` calls too small for an efficient product (a single sentence) are
gathered, per group of layers reading them, into products of up to
:data:`~rankwise.moments.ROWS_PER_PRODUCT` rows, flushed before the pass ends
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
from rankwise.masks import active_mask, channel_rows  # noqa: F401 (channel_rows: imported from here too)
from rankwise.moments import Moments, RowBuffer, Spectrum, computable, finite_sum, naming_layer
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
    def factored(self) -> bool:
        """Whether the output moments are known only as ``W`` applied to the input's (not formed)."""
        return self.output is None and self.weight_matrix is not None

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

        :attr:`factored` statistics have ``C_y,reg = W C_x,reg W^T`` exactly: their spectrum is the
        factorisation's (:meth:`Spectrum.factored`), neither ``C_y`` nor ``W W^T`` formed apart."""
        count = float(self.input.count)
        alpha = shrinkage(regularization, count, self.width)
        if side == "output" and self.factored:
            weight = self.weight_matrix.reshape(self.out_channels, -1).to(torch.float64)
            bias = 0 if self.bias_vector is None else self.bias_vector.to(torch.float64)
            return Spectrum.factored(weight, self.input.covariance, weight @ self.input.mean + bias, alpha,
                                     float(self.input.power), count)
        moments = self.moments(side)
        covariance = moments.covariance
        prior = (torch.eye(len(covariance), dtype=covariance.dtype, device=covariance.device)
                 if side == "input" else self._weight_grams()[1])
        return Spectrum.shrunk(covariance, moments.mean, alpha, self.input.power * prior, count)

    def hook(self, name: str, layer: nn.Module):
        """A forward hook (``with_kwargs=True``) adding one call of ``layer`` to these moments.

        Inside a :func:`sharing_inputs` block the input's batch moments are shared with the
        layers reading the same tensor and small calls' rows are buffered (:class:`SharedInputs`);
        the output is not read when its moments are derived.
        """
        def update(moments: Moments, t: torch.Tensor, side: str, shared: bool) -> None:
            with naming_layer(name, f"{side} activations"):
                add_call(moments, t.detach(), layer, shared)

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


def settled(stats, keep_factored: bool = False):
    """``stats`` with what a dense layer computes on first use filled in
    (:meth:`LayerStatistics.settled`; not for :attr:`~LayerStatistics.factored` ones with
    ``keep_factored``); any other statistics as they are."""
    if not isinstance(stats, LayerStatistics) or (keep_factored and stats.factored):
        return stats
    return stats.settled()


class SharedInputs:
    """One calibration pass's batch moments: shared between the layers reading one input tensor,
    and the rows of small calls gathered into larger products (:class:`~rankwise.moments.RowBuffer`).

    **Sharing.** The batch moments of the last few input tensors seen are kept for the next
    layers that read them, keyed by the tensor's ``data_ptr``, shape, strides, dtype, device and
    ``_version`` (bumped by every in-place change), and by the row layout (``Linear`` or
    convolution) and whether an ``outer`` is tracked. Each entry keeps its tensor alive, so its
    memory cannot be reused by another tensor while the entry exists.

    **Row buffering.** A ``Linear`` call of fewer than
    :data:`~rankwise.moments.ROWS_PER_PRODUCT` rows whose side tracks an ``outer`` adds its
    ``count`` and ``sum`` at once but leaves a copy of its rows pending; the layers reading the
    same tensor join it as they come. When the entry is forgotten (:meth:`clear`, once per
    batch, or when newer tensors push it out) its rows go to the row buffer of exactly that
    group of moments, so one product still serves all siblings. The rows' finiteness is checked
    when they arrive (through their sum), so a NaN raises in the layer and batch that produced it.

    :meth:`flush` multiplies every buffer: :func:`sharing_inputs` calls it when its block ends,
    which is where the statistics leave a calibration pass, so no one reads moments missing rows.

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
        self._buffers: dict[tuple[int, ...], RowBuffer] = {}
        self.computed = 0

    def add(self, moments: Moments, tensor: torch.Tensor, layer: nn.Module, shared: bool) -> None:
        """Add one call's activation ``tensor`` of ``layer`` to ``moments``, computed once per
        tensor and layout when ``shared`` (an input), pending for a small ``Linear`` call."""
        key = _cache_key(tensor, layer, moments) if shared else None
        if key not in self._entries:
            self.computed += 1
            batch = _call_moments(tensor, layer, moments.outer is not None, buffered=True)
            if key is None:
                _add_to(moments, batch)
                self._file(batch)
                return
            if len(self._entries) >= self.SIZE:
                self._file(self._entries.pop(next(iter(self._entries)))[1])
            self._entries[key] = (tensor, batch)
        _add_to(moments, self._entries[key][1])

    def _file(self, batch) -> None:
        """Hand a pending call's rows to the buffer of the moments that read them."""
        if not isinstance(batch, _PendingCall):
            return
        group = tuple(map(id, batch.readers))
        if group not in self._buffers:
            self._buffers[group] = RowBuffer(batch.readers)
        self._buffers[group].append(batch.rows)

    def clear(self) -> None:
        """Forget every entry (and release the tensors it kept), filing their pending rows."""
        for _, batch in self._entries.values():
            self._file(batch)
        self._entries.clear()

    def flush(self, moments: list[Moments] | None = None) -> None:
        """:meth:`clear`, then add the buffered rows' products to their moments: every buffer,
        or, given ``moments``, only (and then forget) the buffers adding to any of them."""
        self.clear()
        chosen = None if moments is None else set(map(id, moments))
        for group, buffer in list(self._buffers.items()):
            if chosen is None or chosen.intersection(group):
                buffer.flush()
                if chosen is not None:
                    del self._buffers[group]


@dataclass
class _PendingCall:
    """A small ``Linear`` call whose rows wait for a product: its ``count``, its float64 ``sum``
    (computed as an unbuffered call's), a float64 copy of its ``rows`` and the moments that read it."""

    count: int
    sum: torch.Tensor
    rows: torch.Tensor
    readers: list


def _add_to(moments: Moments, batch) -> None:
    """Add a call's :class:`Moments`, or the ``count`` and ``sum`` of a :class:`_PendingCall`
    (whose rows then wait for ``moments`` too), to ``moments``."""
    if isinstance(batch, Moments):
        moments.add_(batch)
        return
    moments.count += batch.count
    moments.sum += batch.sum
    batch.readers.append(moments)


_SHARED: contextvars.ContextVar[SharedInputs | None] = contextvars.ContextVar("shared_inputs", default=None)


@contextlib.contextmanager
def sharing_inputs():
    """Context manager: inside it, the dense hooks of this thread share input batch moments and
    buffer small calls' rows through the :class:`SharedInputs` it yields (call its ``clear()``
    between batches); leaving the block normally flushes the buffered rows into the moments.

    A buffer holds the moments objects it adds to: statistics that move to another device
    (block-by-block calibration) flush theirs first (:func:`flush_rows_of`)."""
    shared = SharedInputs()
    token = _SHARED.set(shared)
    try:
        yield shared
        shared.flush()
    finally:
        _SHARED.reset(token)
        shared.clear()


def add_call(moments: Moments, tensor: torch.Tensor, layer: nn.Module, shared: bool) -> None:
    """Add one call's activation ``tensor`` of ``layer`` to ``moments``: through this thread's
    :class:`SharedInputs` when one is active (``shared``: an input its siblings may read), else at once.

    Raises
    ------
    NonFiniteActivationError
        When the activation holds NaN or Inf.
    """
    cache = _SHARED.get()
    if cache is not None:
        cache.add(moments, tensor, layer, shared)
    else:
        moments.add_(_call_moments(tensor, layer, moments.outer is not None, buffered=False))


def flush_rows_of(statistics: list) -> None:
    """Add the rows buffered for the moments of these statistics dataclasses to them (through
    the active :class:`SharedInputs`; nothing outside a :func:`sharing_inputs` block), before
    they are replaced by copies on another device."""
    cache = _SHARED.get()
    if cache is not None:
        cache.flush([value for stats in statistics for value in vars(stats).values()
                     if isinstance(value, Moments)])


def _cache_key(tensor: torch.Tensor, layer: nn.Module, moments: Moments) -> tuple | None:
    """What identifies ``tensor``'s content and its row layout; ``None`` for an inference tensor
    (no version counter: never shared)."""
    if tensor.is_inference():
        return None
    return (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device,
            tensor._version, layer.weight.dim() == 2, moments.outer is not None)


def _call_moments(tensor: torch.Tensor, layer: nn.Module, outer: bool, buffered: bool):
    """The :class:`Moments` of one call's activation ``tensor`` of ``layer``; with ``buffered``,
    a :class:`_PendingCall` instead for a ``Linear`` call of fewer than ``ROWS_PER_PRODUCT`` rows
    that tracks an ``outer``."""
    if layer.weight.dim() != 2:
        channels = tensor if tensor.dim() == layer.weight.dim() else tensor[None]  # batched or not
        return Moments.of_channels(channels.reshape(*channels.shape[:2], -1), outer)
    rows = channel_rows(tensor, layer, active_mask())
    if not (buffered and outer and RowBuffer.takes(rows)):
        return Moments.of_rows(rows, outer)
    return _PendingCall(len(rows), finite_sum(computable(rows).sum(0)), rows.to(torch.float64, copy=True), [])


def _is_affine(layer: nn.Module, kind: str) -> bool:
    """Whether ``layer`` computes ``W x + b`` with its kind's own ``forward`` (else outputs are gathered)."""
    return any(type(layer).forward is t.forward for t in kind_named(kind).classes())
