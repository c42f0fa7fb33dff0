"""Criteria: the estimated error of every option of a layer, in one unit across layers.

A criterion turns the enumerated options of one layer (or of one cell of a recurrent layer),
:class:`Candidates`, into an estimated *error* per option. The frontier of
:mod:`rankwise.ranks.frontier` keeps the options that no other beats on (learnables, error), and
the global allocation of :mod:`rankwise.ranks.allocation` minimises the sum of the layers'
errors under a learnables budget,

    min_{o_l}  sum_l e_l(o_l)   subject to   sum_l (L_l - L_l(o_l)) >= f L,

so errors must be comparable across layers and must add: across the layers of a network, and
across the cells (stacked layers, directions) of a recurrent layer, whose options are the
combinations of its cells' options.

The variance estimate of every option, its ``residual`` (the fraction of the layer's output
variance lost, see :mod:`rankwise.ranks.frontier`), is always computed and kept apart from the
error: the ``explained_variance_goal``, the infos and the trade-off curve speak in it whatever
the criterion.

Adding a criterion is one function ``criterion(npca, name, cell, candidates) -> error`` and one
entry of :data:`CRITERIA`; e.g. a ``"loss"`` criterion giving each option's estimated increase
of the network's loss (absolute, hence comparable across layers and additive across cells).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Candidates:
    """Every option of one layer, or of one cell of a recurrent layer, before any filtering.

    Attributes
    ----------
    side : numpy.ndarray of int
        Codes into :data:`rankwise.ranks.frontier.SIDE_NAMES` (0 dense, 1 input, 2 output,
        3 both); the dense option is last.
    rank_in, rank_out : numpy.ndarray of int
        Ranks of the input and output projections (0 where that side is not projected).
    learnables : numpy.ndarray of int
        Exact learnables of each option.
    residual : numpy.ndarray of float
        Estimated fraction of the output variance of the layer (of the cell, for a recurrent
        cell) that each option loses.
    variance_share : float
        The fraction of the whole layer's output variance that ``residual`` is a fraction of:
        1 for a dense-family layer, ``V_cell / V_layer`` for a recurrent cell.
    """

    side: np.ndarray
    rank_in: np.ndarray
    rank_out: np.ndarray
    learnables: np.ndarray
    residual: np.ndarray
    variance_share: float = 1.0


Criterion = Callable[[object, str, "str | None", Candidates], np.ndarray]


def variance_error(npca, name: str, cell: str | None, candidates: Candidates) -> np.ndarray:
    """The variance criterion: the fraction of the layer's own output variance lost.

    ``e(o) = s res(o)`` with ``s`` the part's :attr:`Candidates.variance_share`, so that the
    errors of a recurrent layer's cells add up to the fraction of the layer's gate variance
    lost, ``sum_cells res_cell V_cell / V_layer``. Errors of different layers are fractions of
    different variances: their sum is the objective of the wave-1 allocation.

    Parameters
    ----------
    npca : NeuronPCA
        The statistics (unused: the residuals already hold everything this criterion needs).
    name : str
        The layer.
    cell : str or None
        The cell of a recurrent layer, ``None`` for a dense-family layer.
    candidates : Candidates

    Returns
    -------
    numpy.ndarray
        One error per candidate.
    """
    return candidates.residual * candidates.variance_share


CRITERIA: dict[str, Criterion] = {"variance": variance_error}


def criterion_named(name: str) -> Criterion:
    """The criterion called ``name``, or a ValueError naming ``criterion`` and the choices."""
    if name not in CRITERIA:
        raise ValueError(f"criterion: expected one of {', '.join(map(repr, CRITERIA))}, got {name!r}.")
    return CRITERIA[name]
