"""What an option of a layer is: a side, ranks, learnables and estimated errors, and a frontier.

A :class:`RankChoice` is one way to build one layer: which side is projected (``"dense"``,
``"input"``, ``"output"`` or ``"both"``), at which ranks, with how many learnables, and the
fraction of the layer's output variance it loses (its *residual*) beside the criterion's
*error* (:mod:`rankwise.ranks.criterion`). A :class:`LayerOptions` holds a layer's *frontier*,
the options that no other beats on both learnables and error (learnables ascending, error
strictly descending, ending at the dense layer), as columns, with the bases its projections
take their first columns from; :class:`RecurrentOptions` and :class:`AttentionOptions` hold
those of layers whose options combine their cells' or parts' options.
:mod:`rankwise.ranks.frontier` enumerates them from the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

SIDE_NAMES = ("dense", "input", "output", "both")
LOSSLESS = 1e-6           # a residual at or below this loses no variance (float32 round-off
                          # of the batch statistics leaves residuals of ~1e-8 at exact rank)


@dataclass(frozen=True)
class RankChoice:
    """One option of one layer.

    Attributes
    ----------
    side : {"dense", "input", "output", "both"}
    rank_in, rank_out : int or None
        Widths of the input and output projections (``None``: side not projected). For a
        recurrent layer of several cells, a tuple over its cells (see :class:`RecurrentOptions`).
    learnables : int
        Learnables of the layer in this form.
    residual : float
        Estimated fraction of the layer's output variance lost.
    error : float
        The criterion's estimated error of this option (:mod:`rankwise.ranks.criterion`).
    measured_explained_variance : float or None
        For a recurrent layer, the explained variance of its output sequence measured on the
        calibration reservoir (:mod:`rankwise.ranks.sequence`); ``None`` where not measured.
    """

    side: str
    rank_in: int | None
    rank_out: int | None
    learnables: int
    residual: float
    error: float
    measured_explained_variance: float | None = None

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.residual


@dataclass
class LayerOptions:
    """The frontier of one layer's options (learnables ascending, error descending).

    ``residual`` holds each option's variance estimate and ``error`` the criterion's (the
    allocation minimises the sum of errors; the explained variance goal reads the residuals).
    ``metric``, when set, is the :class:`~rankwise.metric.OutputMetric` the statistics were
    whitened in: the bases then belong to the whitened layer ``R W`` (see :mod:`rankwise.metric`)
    and the residuals are fractions of the output variance measured in that metric.
    ``input_basis`` holds the input eigenvectors ordered by output-space variance (``None``
    where the input side was not analysed), and ``output_basis`` the output eigenvectors by
    eigenvalue (for one cell of a recurrent layer: those of its hidden state, by gate
    variance): rank ``r`` uses their first ``r`` columns. ``side_residuals[side][r - 1]``
    is the residual of projecting that side alone at rank ``r`` (``res_out`` / ``res_in`` of
    :mod:`rankwise.ranks.frontier`), for each analysed side.
    """

    name: str
    side: np.ndarray
    rank_in: np.ndarray
    rank_out: np.ndarray
    learnables: np.ndarray
    residual: np.ndarray
    error: np.ndarray
    input_basis: torch.Tensor | None
    input_mean: torch.Tensor | None
    output_basis: torch.Tensor
    output_mean: torch.Tensor
    side_residuals: dict[str, np.ndarray] = field(default_factory=dict)
    metric: object = None  # the OutputMetric the bases are expressed in (rankwise.metric), or None
    space: str = "output"  # where the residuals are measured: "output", "batchnorm" or "fisher"

    @property
    def dense_learnables(self) -> int:
        return int(self.learnables[-1])

    @property
    def dense_index(self) -> int:
        """Index of the dense option (the last)."""
        return len(self.learnables) - 1

    def choice(self, index: int) -> RankChoice:
        side = SIDE_NAMES[self.side[index]]
        return RankChoice(side,
                          int(self.rank_in[index]) if side in ("input", "both") else None,
                          int(self.rank_out[index]) if side in ("output", "both") else None,
                          int(self.learnables[index]), float(self.residual[index]),
                          float(self.error[index]))

    def cheapest_within(self, residual: float) -> int:
        """Index of the cheapest option whose residual is at most ``residual``."""
        return int(np.argmax(self.residual <= residual + LOSSLESS))


@dataclass
class RecurrentOptions(LayerOptions):
    """The frontier of an LSTM or GRU layer's options, each a combination of its cells' options.

    ``side``, ``rank_in`` and ``rank_out`` are ``(options, cells)`` arrays, a column per cell of
    ``cells``; the bases and means are dicts keyed by cell: ``input_basis[cell]`` holds the
    eigenvectors of the cell's input ``x_t`` and ``output_basis[cell]`` those of its hidden state
    ``h_t``, each ordered by the gate variance it carries. :meth:`choice` gives the layer's side
    (``"both"`` when its cells project different sides) and, for a layer of several cells, the
    ranks as tuples over its cells. ``side_residuals`` is given for a layer of one cell only.
    """

    cells: tuple = ()

    def choice(self, index: int) -> RankChoice:
        sides = [SIDE_NAMES[code] for code in self.side[index]]
        projected = set(sides) - {"dense"}
        side = "both" if "both" in projected or len(projected) == 2 else next(iter(projected), "dense")
        rank_in, rank_out = (tuple(int(r) if s in (name, "both") else None for s, r in zip(sides, ranks))
                             for name, ranks in (("input", self.rank_in[index]),
                                                 ("output", self.rank_out[index])))
        if len(self.cells) == 1:
            rank_in, rank_out = rank_in[0], rank_out[0]
        return RankChoice(side, rank_in, rank_out, int(self.learnables[index]),
                          float(self.residual[index]), float(self.error[index]))


@dataclass
class AttentionOptions(RecurrentOptions):
    """The frontier of an ``nn.MultiheadAttention``'s options: combinations of its parts' options.

    ``cells`` are its parts (:data:`rankwise.statistics.attention.PARTS`), each projected on its
    output side only; :meth:`choice` gives ``rank_in = None`` and ``rank_out`` as a tuple over
    the parts (``None`` for a part kept dense).
    """

    def choice(self, index: int) -> RankChoice:
        ranks = tuple(int(r) if code else None for code, r in zip(self.side[index], self.rank_out[index]))
        side = "dense" if all(r is None for r in ranks) else "output"
        return RankChoice(side, None, None if side == "dense" else ranks, int(self.learnables[index]),
                          float(self.residual[index]), float(self.error[index]))


@dataclass
class TiedOptions(LayerOptions):
    """The frontier of a tied table and head pair's options (:mod:`rankwise.ranks.tied`): output-side
    ranks ``r`` of the one factored table ``E P P^T`` serving both ends; ``head`` names the head."""

    head: str = ""


def frontier_indices(learnables: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Indices of the factored options beaten by no other, learnables ascending, then dense.

    The dense option (the last of ``learnables``) always closes the frontier.
    """
    order = np.lexsort((error, learnables))
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], error[order]]))[:-1]
    pareto = order[error[order] < best_before]
    dense = len(learnables) - 1
    return np.append(pareto[learnables[pareto] < learnables[dense]], dense)
