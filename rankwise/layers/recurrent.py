"""ProjectedLSTM and ProjectedGRU: recurrent layers acting in the principal subspaces of their
inputs and hidden states.

Counterparts of MATLAB's ``lstmProjectedLayer`` and ``gruProjectedLayer``. In each cell (stacked
layer and direction, see :mod:`rankwise.rnn`) of an ``nn.LSTM`` / ``nn.GRU``, the two products
feeding the gates are projected; the hidden size, the outputs and the states keep the shapes of
the original layer:

- input side, with ``Q_in`` (``D_l x r_in``) the leading principal directions of the cell's
  input ``x_t`` and ``mu_x`` its mean::

      W_ih x  ~  (W_ih Q_in) Q_in^T x  +  W_ih (I - Q_in Q_in^T) mu_x

  stored as the projector ``in_proj[cell] = Q_in`` and ``core["weight_ih_<cell>"] = W_ih Q_in``,
  the constant folded into ``b_ih``;
- recurrent side, with ``Q_out`` (``H x r_out``) those of the hidden states ``h_t`` and ``mu_h``
  their mean::

      W_hh h  ~  (W_hh Q_out) Q_out^T h  +  W_hh (I - Q_out Q_out^T) mu_h

  stored as ``out_proj[cell] = Q_out`` and ``core["weight_hh_<cell>"] = W_hh Q_out``, the constant
  folded into ``b_hh`` (for a GRU, inside the reset gate's product, where ``W_hn h`` sits).

A cell projects one side, both or neither. A layer without biases takes no means (its
statistics are uncentred). With full orthonormal bases the layer computes the original exactly.

Two execution paths compute the same function:

- ``"dense"`` rebuilds ``W_ih Q_in Q_in^T`` and ``W_hh Q_out Q_out^T`` at each call (``G H r
  (D_l + H)`` multiply-adds per cell) and runs torch's fused kernel: fewer stored learnables,
  the speed of the original layer;
- ``"factored"`` runs the recurrence step by step with the projections inside it: per time step
  and sequence ``r_out (H + G H)`` multiply-adds instead of ``G H^2`` for the recurrent side
  (``r_in (D_l + G H)`` instead of ``G H D_l`` for the input side), but several torch operations
  launched per time step.

``execution="auto"`` (the default) picks ``"factored"`` only where the multiply-adds it saves
pay for its per-step overhead (:func:`factored_is_faster`, calibrated on a CPU with one
thread). There, for an LSTM the dense path wins up to ``H = 128`` and the factored one at
``H = 512``; torch's fused GRU kernel is slower, so a GRU gains from the factored path from
``H = 256`` at batches of 8, and at smaller sizes for large batches. Elsewhere (a GPU, where
fused kernels make per-step launches relatively costlier) ``"auto"`` takes the dense path: the
calibration does not cover it.

There is no plain torch layer with these parameters (the projection of ``h_{t-1}`` sits inside
the recurrence), so :meth:`ProjectedRecurrent.unpack` returns the wrapper itself;
:meth:`ProjectedRecurrent.to_dense` gives the ``nn.LSTM`` / ``nn.GRU`` with the rebuilt weights,
computing the same outputs with the original's learnables (e.g. for export).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.layers.base import ProjectedLayer
from rankwise.layers.recurrent_weights import projected_parameters
from rankwise.rnn import GATES, cell_input_sizes, cell_names, fused, normalise

EXECUTIONS = ("auto", "dense", "factored")

FACTORED_STEP_OVERHEAD = {"lstm": 1.0e4, "gru": 3.0e5}
"""Per cell and time step, the fixed cost of the factored path's torch calls, in multiply-adds
(calibrated by ``bench/recurrent_execution.py`` on a 2-core x86 CPU, one torch thread)."""

FACTORED_GATE_OVERHEAD = {"lstm": 230.0, "gru": 35.0}
"""Per gate pre-activation and time step, the extra cost of the factored path's unfused
element-wise operations over the fused kernel's, in multiply-adds (calibrated likewise)."""


def factored_is_faster(kind: str, batch: int, hidden_size: int, savings: int, cells: int) -> bool:
    """Whether the factored path is expected to beat the dense one on a batch.

    With ``S`` the multiply-adds per time step and sequence that the projections save (summed
    over cells) and ``N`` the batch size, the factored path wins when::

        N S  >  cells (FACTORED_STEP_OVERHEAD[kind] + FACTORED_GATE_OVERHEAD[kind] N G H)

    i.e. when its saving outweighs its per-step launch costs and its unfused gate arithmetic.

    Parameters
    ----------
    kind : {"lstm", "gru"}
    batch : int
        ``N``, sequences in the batch.
    hidden_size : int
        ``H``.
    savings : int
        ``S``.
    cells : int
        Cells of the layer.
    """
    overhead = FACTORED_STEP_OVERHEAD[kind] + FACTORED_GATE_OVERHEAD[kind] * batch * GATES[kind] * hidden_size
    return batch * savings > cells * overhead


class ProjectedRecurrent(ProjectedLayer):
    """Base of :class:`ProjectedLSTM` and :class:`ProjectedGRU`; see the module docstring.

    Called like the torch layer it replaces: ``layer(input, hx=None)`` with a padded batch
    (``batch_first`` either way), an unbatched sequence or a ``PackedSequence``, returns
    ``(output, h_n)`` (``(output, (h_n, c_n))`` for an LSTM).

    Parameters
    ----------
    in_proj : torch.nn.ParameterDict or None
        ``Q_in`` (``D_l x r_in``) of each cell whose input side is projected.
    core : torch.nn.ParameterDict
        ``weight_ih_<cell>`` (``G H x r_in`` or ``G H x D_l``), ``weight_hh_<cell>``
        (``G H x r_out`` or ``G H x H``) and, with ``bias``, ``bias_ih_<cell>``, ``bias_hh_<cell>``.
    out_proj : torch.nn.ParameterDict or None
        ``Q_out`` (``H x r_out``) of each cell whose hidden-state side is projected.
    input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional
        As for ``nn.LSTM``.
    execution : {"auto", "dense", "factored"}
        The execution path (see the module docstring); an attribute that can be changed later.
    """

    kind = ""
    dense_type = nn.RNNBase

    def __init__(self, in_proj: nn.ParameterDict | None, core: nn.ParameterDict,
                 out_proj: nn.ParameterDict | None, *, input_size: int, hidden_size: int,
                 num_layers: int = 1, bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, execution: str = "auto"):
        super().__init__(in_proj, core, out_proj)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        self.dropout = float(dropout)
        self.execution = execution

    @property
    def execution(self) -> str:
        """``"auto"``, ``"dense"`` or ``"factored"``."""
        return self._execution

    @execution.setter
    def execution(self, value: str) -> None:
        if value not in EXECUTIONS:
            raise ValueError(f"execution: expected one of {', '.join(map(repr, EXECUTIONS))}, "
                             f"got {value!r}.")
        self._execution = value

    @property
    def cells(self) -> list[str]:
        """Cell names in torch's order: ``l0``, ``l0_reverse``, ``l1``, ..."""
        return cell_names(self.num_layers, self.bidirectional)

    @property
    def rank_in(self):
        """``r_in`` of the cell (``None`` where not projected); a tuple over the cells when several."""
        return self._ranks(self.in_proj)

    @property
    def rank_out(self):
        """``r_out`` of the cell (``None`` where not projected); a tuple over the cells when several."""
        return self._ranks(self.out_proj)

    def _ranks(self, projectors):
        ranks = tuple(None if q is None else q.shape[1]
                      for q in (_projector(projectors, cell) for cell in self.cells))
        return ranks[0] if len(ranks) == 1 else ranks

    # Forward ---------------------------------------------------------------------------------
    def forward(self, input, hx=None):
        call = normalise(self.kind, self, input, hx)
        factored = self.uses_factored(call.hx[0].shape[1], call.input.device)
        return call.finish(*(self._factored if factored else self._dense)(call))

    def uses_factored(self, batch: int, device: torch.device) -> bool:
        """Whether a call on ``batch`` sequences on ``device`` takes the factored path (``"auto"``:
        by :func:`factored_is_faster` on the CPU, the dense path elsewhere)."""
        if self.execution != "auto":
            return self.execution == "factored"
        return device.type == "cpu" and factored_is_faster(self.kind, batch, self.hidden_size,
                                                           self._savings(), len(self.cells))

    def _savings(self) -> int:
        """Multiply-adds per time step and sequence that the projections save, over all cells."""
        gate_rows = GATES[self.kind] * self.hidden_size
        total = 0
        for cell, width in zip(self.cells, cell_input_sizes(self)):
            for projectors, dim in ((self.in_proj, width), (self.out_proj, self.hidden_size)):
                q = _projector(projectors, cell)
                total += 0 if q is None else gate_rows * dim - q.shape[1] * (dim + gate_rows)
        return total

    def _dense(self, call):
        weights = [w for cell in self.cells for w in self.dense_weights(cell)]
        return fused(self.kind, call, call.input, call.hx, weights, has_biases=self.bias,
                     num_layers=self.num_layers, dropout=self.dropout, training=self.training,
                     bidirectional=self.bidirectional)

    def dense_weights(self, cell: str) -> list[torch.Tensor]:
        """``[W_ih Q_in Q_in^T, W_hh Q_out Q_out^T, b_ih, b_hh]`` of a cell, as torch orders them
        (a side not projected keeps its weight; no biases without ``bias``)."""
        weights = [self._expanded(self.in_proj, "weight_ih", cell),
                   self._expanded(self.out_proj, "weight_hh", cell)]
        biases = [self.core[f"bias_ih_{cell}"], self.core[f"bias_hh_{cell}"]] if self.bias else []
        return weights + biases

    def _expanded(self, projectors, name: str, cell: str) -> torch.Tensor:
        weight, q = self.core[f"{name}_{cell}"], _projector(projectors, cell)
        return weight if q is None else weight @ q.T

    def _factored(self, call):
        directions = 2 if self.bidirectional else 1
        sequence, finals = call.input, []
        for layer in range(self.num_layers):
            outputs = []
            for index in range(layer * directions, (layer + 1) * directions):
                cell = self.cells[index]
                gates = call.steps(self._input_gates(cell, sequence))
                steps, final = self._recur(cell, gates, tuple(s[index] for s in call.hx),
                                           reverse=cell.endswith("_reverse"))
                outputs.append(call.join(steps))
                finals.append(final)
            sequence = torch.cat(outputs, -1)
            if self.training and self.dropout and layer < self.num_layers - 1:
                sequence = F.dropout(sequence, self.dropout, training=True)
        return sequence, tuple(torch.stack(states) for states in zip(*finals))

    def _recur(self, cell: str, gates: list[torch.Tensor], state: tuple, reverse: bool):
        """Run one cell over the per-step input gates; steps of a packed batch hold fewer rows
        as sequences end, the states of ended sequences are kept."""
        recurrent = self._recurrent(cell)
        outputs = [None] * len(gates)
        for t in (reversed(range(len(gates))) if reverse else range(len(gates))):
            rows = len(gates[t])
            new = self._step(gates[t], tuple(s[:rows] for s in state), recurrent)
            ended = len(state[0]) - rows
            state = tuple(torch.cat([n, s[rows:]]) for n, s in zip(new, state)) if ended else new
            outputs[t] = new[0]
        return outputs, state

    def _project_input(self, cell: str, sequence: torch.Tensor) -> torch.Tensor:
        q = _projector(self.in_proj, cell)
        return sequence if q is None else sequence @ q

    def _recurrent(self, cell: str):
        """``(h, base) -> base + W_hh Q_out Q_out^T h`` for one cell (``base`` may be ``None``),
        the projection applied first."""
        weight, q = self.core[f"weight_hh_{cell}"].T, _projector(self.out_proj, cell)

        def product(h, base):
            z = h if q is None else h @ q
            return z @ weight if base is None else torch.addmm(base, z, weight)

        return product

    def _input_gates(self, cell: str, sequence: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _step(gates: torch.Tensor, state: tuple, recurrent) -> tuple:
        raise NotImplementedError

    # Conversions -----------------------------------------------------------------------------
    def unpack(self) -> "ProjectedRecurrent":
        """The wrapper itself: no plain torch layer runs a recurrence with projected states.

        :meth:`to_dense` gives an equivalent ``nn.LSTM`` / ``nn.GRU`` with the original's
        learnables.
        """
        return self

    def to_dense(self) -> nn.Module:
        """The ``nn.LSTM`` / ``nn.GRU`` with the rebuilt weights ``W Q Q^T``: the same outputs
        as this layer (not the same learnables)."""
        like = self.core["weight_ih_l0"]
        dense = self.dense_type(self.input_size, self.hidden_size, self.num_layers, bias=self.bias,
                                batch_first=self.batch_first, dropout=self.dropout,
                                bidirectional=self.bidirectional, device=like.device, dtype=like.dtype)
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        with torch.no_grad():
            for cell in self.cells:
                for name, weight in zip(names, self.dense_weights(cell)):
                    getattr(dense, f"{name}_{cell}").copy_(weight)
        return dense.requires_grad_(like.requires_grad)

    def extra_repr(self) -> str:
        options = [f"{self.input_size}, {self.hidden_size}"]
        options += [f"{name}={getattr(self, name)}" for name, default in
                    (("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0.0),
                     ("bidirectional", False)) if getattr(self, name) != default]
        return ", ".join(options + [super().extra_repr(), f"execution={self.execution!r}"])

    def spec(self) -> dict:
        """Class name, ranks per cell (lists for several cells) and execution path (JSON-friendly).

        With the original ``nn.LSTM`` / ``nn.GRU``, :meth:`from_spec` rebuilds the structure.
        """
        def plain(ranks):
            return list(ranks) if isinstance(ranks, tuple) else ranks

        return {"type": type(self).__name__, "rank_in": plain(self.rank_in),
                "rank_out": plain(self.rank_out), "execution": self.execution}

    @classmethod
    def from_spec(cls, layer: nn.Module, spec: dict) -> "ProjectedRecurrent":
        """A wrapper with the structure described by ``spec`` (see :meth:`spec`) for ``layer``.

        Its weights are placeholders (the first columns of the identity as bases): load the
        saved state dict into it.
        """
        cls.check_spec_type(spec)
        cells = cell_names(layer.num_layers, layer.bidirectional)

        def bases(key: str, dims: list[int]) -> dict:
            ranks = spec[key] if isinstance(spec[key], list) else [spec[key]]
            if len(ranks) != len(cells):
                raise ValueError(f"spec: {key!r} gives {len(ranks)} ranks for {len(cells)} cells.")
            return {cell: torch.eye(dim, dtype=torch.float64)[:, :rank]
                    for cell, rank, dim in zip(cells, ranks, dims) if rank is not None}

        return cls.from_dense(layer, input_basis=bases("rank_in", cell_input_sizes(layer)),
                              output_basis=bases("rank_out", [layer.hidden_size] * len(cells)),
                              execution=spec.get("execution", "auto"))

    # Construction ----------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, layer: nn.Module, input_basis=None, input_mean=None, output_basis=None,
                   output_mean=None, execution: str = "auto") -> "ProjectedRecurrent":
        """Project an ``nn.LSTM`` / ``nn.GRU`` onto the given orthonormal bases, cell by cell.

        Parameters
        ----------
        layer : torch.nn.LSTM or torch.nn.GRU
            The dense layer (no ``proj_size``). It is not modified; the wrapper takes its
            training mode (which decides whether dropout acts between layers).
        input_basis : dict of str to torch.Tensor, optional
            ``Q_in`` (``D_l x r_in``, orthonormal columns) of each cell whose input side is
            projected, keyed by cell name (``"l0"``, ``"l0_reverse"``, ...). A layer of one cell
            also takes the tensor itself.
        input_mean : dict of str to torch.Tensor, optional
            ``mu_x`` (``D_l``) of those cells, folded into ``b_ih``; zero when omitted.
        output_basis, output_mean : optional
            ``Q_out`` (``H x r_out``) and ``mu_h`` (``H``) of the hidden-state side, likewise.
        execution : {"auto", "dense", "factored"}

        Returns
        -------
        ProjectedRecurrent
        """
        if not isinstance(layer, cls.dense_type) or getattr(layer, "proj_size", 0):
            raise ValueError(f"from_dense: expected an nn.{cls.dense_type.__name__} (without "
                             f"proj_size), got {type(layer).__name__}.")
        in_proj, core, out_proj = projected_parameters(layer, input_basis, input_mean, output_basis, output_mean)
        projected = cls(in_proj, core, out_proj, input_size=layer.input_size,
                        hidden_size=layer.hidden_size, num_layers=layer.num_layers, bias=layer.bias,
                        batch_first=layer.batch_first, dropout=layer.dropout,
                        bidirectional=layer.bidirectional, execution=execution)
        return projected.train(layer.training)


def _projector(projectors: nn.ParameterDict | None, cell: str) -> torch.Tensor | None:
    return projectors[cell] if projectors is not None and cell in projectors else None


def __getattr__(name: str):
    """``ProjectedLSTM`` / ``ProjectedGRU`` under their former home, for structures pickled by older
    versions (their classes now live in :mod:`rankwise.layers.lstm` and :mod:`rankwise.layers.gru`)."""
    if name in ("ProjectedLSTM", "ProjectedGRU"):
        from rankwise import layers
        return getattr(layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
