"""Activation statistics of LSTM and GRU layers, for every stacked layer and direction.

Projecting a cell ``(l, d)`` of an ``nn.LSTM`` / ``nn.GRU`` (see :mod:`rankwise.rnn`) needs the
moments of the two sequences its weights multiply:

- ``x_t``, the input of stacked layer ``l`` (shared by both directions), read by ``W_ih``;
- ``h_t``, the cell's own hidden states, read by ``W_hh`` as ``h_{t-1}``; all time steps of all
  sequences are pooled (the outputs ``h_1 .. h_T``: the recurrence reads the same states but
  for the initial one, in place of the last).

Both are kept as the moments of the module's input and of each stacked layer's output
``[h_t^fwd; h_t^rev]`` (``outputs[l]``, ``D H`` wide): the input of layer ``l + 1`` is
``outputs[l]`` and the hidden states of direction ``d`` are its ``d``-th diagonal block. A hook
on the module sees only the module's input and the last layer's output; the inner layers'
outputs are recomputed in the hook, layer by layer, with torch's fused kernel on the module's
own weights (:func:`rankwise.rnn.run_layer`; calibration runs in eval mode, so no dropout acts
between layers). Rows are the real time steps of the sequences: a ``PackedSequence``
contributes no padding.

Both sides are regularised toward isotropy, as the input side of a dense layer is
(:mod:`rankwise.statistics.spectra`)::

    C_reg = (1 - alpha) C + alpha s I,     s = tr(C) / d,     alpha = w / (n + w)  ("auto")

with ``w = max(D_l, H)``, the cell's largest width. A module without biases has nowhere to fold
a mean into, so its sides are analysed on the uncentred second moment ``S / n`` (mean zero).
Directions are judged by what they carry into the gates, through the Grams ``W_ih^T W_ih`` and
``W_hh^T W_hh`` kept here (see :mod:`rankwise.ranks`).

**The reservoir.** Moments of one time step do not tell how an error of the gates grows through
the recurrence (``h_t`` feeds ``h_{t+1}``: a small per-step error can accumulate over the
sequence). So the statistics also keep a bounded sample of the module's calibration input, the
first sequences it was called with, whole, up to :data:`RESERVOIR_STEPS` time steps in all (the
one crossing the cap cut to fit), as plain CPU tensors ``(T_i, input_size)``: the decisions run
the original and the projected layer on it and measure the error of the output sequence itself
(:mod:`rankwise.ranks.sequence`). The reservoir is a sample, not a moment: shards' reservoirs
are concatenated up to the cap, and statistics loaded from a file written before it existed
have ``reservoir = None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, unpack_sequence

from rankwise.moments import Moments, Spectrum
from rankwise.rnn import cell_input_sizes, cell_names, normalise, run_layer
from rankwise.statistics.spectra import shrinkage

SIDES = ("input", "output")

SIDE_WEIGHTS = {"input": "weight_ih", "output": "weight_hh"}
"""The weights reading each side of a cell: ``"output"`` is the hidden state ``h_t``."""

RESERVOIR_STEPS = 4096
"""Time steps of calibration input kept in :attr:`RecurrentStatistics.reservoir` (all sequences)."""


@dataclass
class RecurrentStatistics:
    """What NeuronPCA knows about one LSTM or GRU layer.

    Attributes
    ----------
    kind : {"lstm", "gru"}
    input_size, hidden_size, num_layers : int
    bidirectional, bias : bool
    input : Moments
        Of the module's input rows ``x_t`` (``input_size`` wide).
    outputs : list of Moments
        Per stacked layer, of its output rows ``h_t`` (both directions, ``D H`` wide).
    input_grams, hidden_grams : list of torch.Tensor
        Per cell (torch's order), ``W_ih^T W_ih`` (``D_l x D_l``) and ``W_hh^T W_hh`` (``H x H``).
    reservoir : list of torch.Tensor or None
        The first calibration sequences, ``(T_i, input_size)`` each on the CPU, at most
        :data:`RESERVOIR_STEPS` steps in all (see the module docstring); ``None`` for
        statistics read from a file written before the reservoir existed.
    """

    kind: str
    input_size: int
    hidden_size: int
    num_layers: int
    bidirectional: bool
    bias: bool
    input: Moments
    outputs: list
    input_grams: list
    hidden_grams: list
    reservoir: list | None = None

    @classmethod
    def for_layer(cls, module: nn.Module, kind: str) -> "RecurrentStatistics":
        """Empty statistics of ``module``, a row of :data:`rankwise.kinds.KINDS` called ``kind``."""
        cells = cell_names(module.num_layers, module.bidirectional)
        device = module.weight_ih_l0.device
        width = module.hidden_size * (2 if module.bidirectional else 1)

        def grams(side):
            weights = (getattr(module, f"{SIDE_WEIGHTS[side]}_{cell}").detach() for cell in cells)
            return [(w.T @ w).to(torch.float64) for w in weights]

        return cls(kind, module.input_size, module.hidden_size, module.num_layers,
                   module.bidirectional, module.bias, Moments.zeros(module.input_size, device),
                   [Moments.zeros(width, device) for _ in range(module.num_layers)],
                   grams("input"), grams("output"), [])

    @property
    def cells(self) -> list[str]:
        """Cell names in torch's order: ``l0``, ``l0_reverse``, ``l1``, ..."""
        return cell_names(self.num_layers, self.bidirectional)

    @property
    def shape(self) -> tuple:
        """``(kind, input_size, hidden_size, num_layers, bidirectional)``."""
        return self.kind, self.input_size, self.hidden_size, self.num_layers, self.bidirectional

    @property
    def width(self) -> int:
        """Largest width among the analysed sides of all cells."""
        return max(*cell_input_sizes(self), self.hidden_size)

    def resolve_cell(self, cell: str | None) -> str:
        """``cell`` checked; ``None`` stands for the only cell of a one-cell module."""
        cells = self.cells
        if cell is None and len(cells) == 1:
            return cells[0]
        if cell not in cells:
            raise ValueError(f"cell: expected one of {', '.join(map(repr, cells))} (stacked layer "
                             f"and direction), got {cell!r}.")
        return cell

    def spectra_keys(self) -> list[tuple[str, str]]:
        """``(side, cell)`` of every spectrum this layer has: both sides of every cell."""
        return [(side, cell) for cell in self.cells for side in SIDES]

    def resolve_request(self, name: str, side: str, cell: str | None) -> str:
        """The cell :meth:`spectrum` reads for ``cell`` (see :meth:`resolve_cell`)."""
        return self.resolve_cell(cell)

    def cell_input_size(self, cell: str) -> int:
        """``D_l``: width of the input sequence of the cell's stacked layer."""
        return cell_input_sizes(self)[self._index(cell)]

    def moments(self, side: str, cell: str) -> Moments:
        """Moments of the cell's input ``x_t`` (``"input"``) or hidden states ``h_t`` (``"output"``)."""
        layer, direction = divmod(self._index(cell), self._directions)
        if side == "input":
            return self.input if layer == 0 else self.outputs[layer - 1]
        return self.outputs[layer].block(direction * self.hidden_size, (direction + 1) * self.hidden_size)

    def weight_gram(self, side: str, cell: str) -> torch.Tensor:
        """``W_ih^T W_ih`` (``"input"``) or ``W_hh^T W_hh`` (``"output"``) of the cell."""
        return (self.input_grams if side == "input" else self.hidden_grams)[self._index(cell)]

    def spectrum(self, side: str, cell: str, regularization) -> Spectrum:
        """Principal components of one side of one cell (see the module docstring)."""
        moments = self.moments(side, cell)
        covariance = moments.covariance if self.bias else moments.second_moment
        mean = moments.mean if self.bias else torch.zeros_like(moments.sum)
        alpha = shrinkage(regularization, float(moments.count), max(self.cell_input_size(cell),
                                                                     self.hidden_size))
        power = covariance.trace() / len(covariance)
        identity = torch.eye(len(covariance), dtype=covariance.dtype, device=covariance.device)
        return Spectrum.shrunk(covariance, mean, alpha, power * identity)

    def __add__(self, other: "RecurrentStatistics") -> "RecurrentStatistics":
        if self.shape != other.shape:
            raise ValueError("the two statistics describe layers of different shapes")
        reservoir = None
        if self.reservoir is not None or other.reservoir is not None:
            reservoir = _fill([*(self.reservoir or [])], other.reservoir or [])
        return RecurrentStatistics(**{**vars(self), "input": self.input + other.input,
                                      "outputs": [a + b for a, b in zip(self.outputs, other.outputs)],
                                      "reservoir": reservoir})

    @property
    def reservoir_steps(self) -> int:
        """Time steps held in the reservoir (0 without one)."""
        return sum(len(sequence) for sequence in self.reservoir or [])

    def hook(self, name: str, layer: nn.Module):
        """A forward hook (``with_kwargs=True``) adding one call of ``layer`` to these moments."""

        def hook(module, args, kwargs, output):
            given = args[0] if args else kwargs["input"]
            call = normalise(self.kind, module, given, args[1] if len(args) > 1 else kwargs.get("hx"))
            if self.reservoir is not None and self.reservoir_steps < RESERVOIR_STEPS:
                _fill(self.reservoir, _sequences(given, module.batch_first))
            sequence = call.input
            _record(self.input, sequence, name, "input")
            for stacked in range(self.num_layers - 1):
                sequence = run_layer(self.kind, module, call, sequence, stacked)
                _record(self.outputs[stacked], sequence, name, f"output of stacked layer {stacked}")
            last = output[0].data if isinstance(output[0], PackedSequence) else output[0]
            _record(self.outputs[-1], last, name, "output")

        return hook

    @property
    def _directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _index(self, cell: str) -> int:
        return self.cells.index(self.resolve_cell(cell))


def _sequences(given, batch_first: bool) -> list[torch.Tensor]:
    """The sequences of one call's input, ``(T_i, D)`` each, unpadded for a ``PackedSequence``."""
    if isinstance(given, PackedSequence):
        return unpack_sequence(given)
    if given.dim() == 2:
        return [given]
    return list(given.unbind(0 if batch_first else 1))


def _fill(reservoir: list, sequences) -> list:
    """Append ``sequences`` (detached, on the CPU) to ``reservoir`` while it holds fewer than
    :data:`RESERVOIR_STEPS` steps, the last one cut to the cap; returns ``reservoir``."""
    room = RESERVOIR_STEPS - sum(len(s) for s in reservoir)
    for sequence in sequences:
        if room <= 0:
            break
        reservoir.append(sequence[:room].detach().cpu().clone())
        room -= len(reservoir[-1])
    return reservoir


def _record(moments: Moments, sequence: torch.Tensor, name: str, what: str) -> None:
    moments.update_of(sequence.detach().reshape(-1, sequence.shape[-1]), name, what)
