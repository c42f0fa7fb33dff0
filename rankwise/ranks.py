"""Rank decisions: which side of each layer to project, at which ranks.

Every option of a layer is judged by the fraction of the variance of the layer's **output**
that it loses, its *residual*, so that options of all layers and sides compare:

- output projection at rank ``r`` (eigenvalues ``mu_1 >= mu_2 >= ...`` of the output
  covariance): ``res_out(r) = sum_{j > r} mu_j / sum_j mu_j``;
- input projection at rank ``r`` keeps the ``r`` input eigenvectors ``q_j`` (eigenvalue
  ``lambda_j``) with the largest output-space variance ``v_j = lambda_j |W q_j|^2`` (for a
  convolution ``|W q|^2 = sum_k |W_k q|^2``, positions treated as independent):
  ``res_in(r) = sum_{j > r} v_j / sum_j v_j``;
- both sides: the two errors are orthogonal (one inside ``range(P)``, one outside), so
  ``res_both <= res_in(r_in) + res_out(r_out)``, which is used as the (conservative) estimate.

An LSTM or GRU layer (see :mod:`rankwise.rnn`) is projected per cell (stacked layer and
direction) on two sides: its input, ``W_ih -> W_ih Q_in Q_in^T``, and its hidden state,
``W_hh -> W_hh Q_out Q_out^T``. Their common output space is the gate pre-activations
``z_t = W_ih x_t + W_hh h_{t-1} + b``: an eigenvector ``q_j`` (eigenvalue ``lambda_j``) of a side
read by ``W`` carries ``v_j = lambda_j |W q_j|^2`` of their variance, so, with the directions of
each side ordered by ``v_j``,

    res_in(r)  = sum_{j > r} v_j^in / V,    res_out(r) = sum_{j > r} v_j^out / V,
    V = sum_j v_j^in + sum_j v_j^out,

and projecting both sides loses ``res_in(r_in) + res_out(r_out)`` (the two terms of ``z_t``
treated as uncorrelated: an estimate). The cells of a layer are independent: its options are
the combinations of its cells' options, judged by the fraction of the layer's gate variance
lost, ``sum_cells res_cell V_cell / sum_cells V_cell``, and filtered to their frontier.

Each option also has an exact learnables count (:func:`rankwise.learnables.factored_learnables`).
Options that are beaten on both counts are dropped, which leaves each layer a *frontier*:
learnables ascending, residual strictly descending, ending at the dense layer (residual 0).

- ``explained_variance_goal = g``: each layer takes its cheapest option with
  ``res <= 1 - g``.
- ``learnables_reduction_goal = f``: ranks are allocated globally to minimise the sum of the
  layers' residuals while removing at least ``f`` of the network's learnables. Each layer's
  frontier is replaced by its lower convex hull in (learnables saved, residual); hull steps of
  all layers are taken in order of residual added per learnable saved (optimal for the
  Lagrangian relaxation); the layer of the last step then takes the least lossy point of its
  whole frontier that still meets the goal. Steps that cost no variance are always taken, and
  when the goal is above what is possible every layer goes to its cheapest option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from rankwise.learnables import dense_learnables, factored_learnables, recurrent_learnables
from rankwise.statistics import RecurrentStatistics
from rankwise.rnn import GATES

SIDE_NAMES = ("dense", "input", "output", "both")
LOSSLESS = 1e-6           # a residual at or below this loses no variance (float32 round-off
                          # of the batch statistics leaves residuals of ~1e-8 at exact rank)
MAX_BOTH_INPUT_RANKS = 256  # input ranks tried in the both-sides grid


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
    """

    side: str
    rank_in: int | None
    rank_out: int | None
    learnables: int
    residual: float

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.residual


@dataclass
class LayerOptions:
    """The frontier of one layer's options (learnables ascending, residual descending).

    ``input_basis`` holds the input eigenvectors ordered by output-space variance (``None``
    where the input side was not analysed), and ``output_basis`` the output eigenvectors by
    eigenvalue (for one cell of a recurrent layer: those of its hidden state, by gate
    variance): rank ``r`` uses their first ``r`` columns. ``side_residuals[side][r - 1]``
    is the residual of projecting that side alone at rank ``r`` (``res_out`` / ``res_in`` of
    the module docstring), for each analysed side.
    """

    name: str
    side: np.ndarray
    rank_in: np.ndarray
    rank_out: np.ndarray
    learnables: np.ndarray
    residual: np.ndarray
    input_basis: torch.Tensor | None
    input_mean: torch.Tensor | None
    output_basis: torch.Tensor
    output_mean: torch.Tensor
    side_residuals: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def dense_learnables(self) -> int:
        return int(self.learnables[-1])

    def choice(self, index: int) -> RankChoice:
        side = SIDE_NAMES[self.side[index]]
        return RankChoice(side,
                          int(self.rank_in[index]) if side in ("input", "both") else None,
                          int(self.rank_out[index]) if side in ("output", "both") else None,
                          int(self.learnables[index]), float(self.residual[index]))

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
                          float(self.residual[index]))


def layer_options(npca, name: str) -> LayerOptions:
    """Enumerate and filter the options of layer ``name`` from its statistics.

    Input and both-sides options exist only where the input side was analysed (not for
    ``Linear`` layers, where output projection is optimal; see :mod:`rankwise.pca`). An LSTM or
    GRU layer gets its :class:`RecurrentOptions`.
    """
    stats = npca.statistics(name)
    if isinstance(stats, RecurrentStatistics):
        return _recurrent_options(npca, name)
    out_spec = npca.spectrum(name, "output")
    res_out = _residual_curve(out_spec.eigenvalues)
    in_c, out_c, k = (stats.in_channels, stats.out_channels, stats.kernel_numel)
    input_basis = input_mean = res_in = None
    if stats.input.outer is not None:
        in_spec = npca.spectrum(name, "input")
        input_variance, input_basis = _ranked_directions(in_spec, stats.weight_gram_input)
        res_in, input_mean = _residual_curve(input_variance), in_spec.mean
    side, rank_in, rank_out, learnables, residual = _all_options(
        res_in, res_out, partial(factored_learnables, in_c, out_c, k),
        dense_learnables(in_c, out_c, k, stats.bias))
    keep = _frontier(learnables, residual)
    side_residuals = {"output": res_out} if res_in is None else {"input": res_in, "output": res_out}
    return LayerOptions(name, side[keep], rank_in[keep], rank_out[keep], learnables[keep],
                        residual[keep], input_basis, input_mean, out_spec.eigenvectors, out_spec.mean,
                        side_residuals)


def _ranked_directions(spectrum, weight_gram: torch.Tensor):
    """``(v, Q)``: the output-space variances ``v_j = lambda_j q_j^T W^T W q_j``, descending,
    and the eigenvectors ``q_j`` in that order."""
    v = spectrum.eigenvectors
    variance = spectrum.eigenvalues * torch.einsum("ij,ik,kj->j", v, weight_gram, v)
    order = torch.argsort(variance, descending=True)
    return variance[order], v[:, order]


def _recurrent_options(npca, name: str) -> RecurrentOptions:
    """The options of a recurrent layer: every cell's frontier, then their combinations."""
    cells = npca.statistics(name).cells
    frontiers = [_cell_options(npca, name, cell) for cell in cells]
    picks, learnables, lost = _combine(frontiers)
    total = sum(variance for _, variance in frontiers)
    residual = lost / total if total > 0 else np.zeros(len(lost))

    def per_cell(field_name):
        return np.stack([getattr(opts, field_name)[picks[:, k]]
                         for k, (opts, _) in enumerate(frontiers)], 1)

    def by_cell(field_name):
        return {cell: getattr(opts, field_name) for cell, (opts, _) in zip(cells, frontiers)}

    return RecurrentOptions(name, per_cell("side"), per_cell("rank_in"), per_cell("rank_out"),
                            learnables, residual, by_cell("input_basis"), by_cell("input_mean"),
                            by_cell("output_basis"), by_cell("output_mean"),
                            frontiers[0][0].side_residuals if len(cells) == 1 else {}, tuple(cells))


def _cell_options(npca, name: str, cell: str) -> tuple[LayerOptions, float]:
    """One cell's frontier (residuals relative to its gate variance ``V``) and ``V``."""
    stats = npca.statistics(name)
    spectra = {side: npca.spectrum(name, side, cell) for side in ("input", "output")}
    ranked = {side: _ranked_directions(spectra[side], stats.weight_gram(side, cell)) for side in spectra}
    total = float(ranked["input"][0].sum() + ranked["output"][0].sum())
    side_residuals = {side: _residual_curve(ranked[side][0], total) for side in ranked}
    count = partial(recurrent_learnables, stats.cell_input_size(cell), stats.hidden_size,
                    GATES[stats.kind], stats.bias)
    options = _all_options(side_residuals["input"], side_residuals["output"], count, count(None, None))
    keep = _frontier(options[3], options[4])
    side, rank_in, rank_out, learnables, residual = (a[keep] for a in options)
    return LayerOptions(name, side, rank_in, rank_out, learnables, residual,
                        ranked["input"][1], spectra["input"].mean, ranked["output"][1],
                        spectra["output"].mean, side_residuals), total


def _combine(frontiers: list[tuple[LayerOptions, float]]):
    """The frontier of the combinations of independent cells' options.

    A combination's learnables and lost variance (``residual V``) are the sums over the
    cells. Returns ``(picks, learnables, lost)``: ``picks[i, k]`` is the option of cell ``k`` in
    combination ``i``; the all-dense combination is last.
    """
    picks, learnables, lost = np.zeros((1, 0), int), np.zeros(1, int), np.zeros(1)
    for options, variance in frontiers:
        count = len(options.learnables)
        learnables = (learnables[:, None] + options.learnables[None, :]).ravel()
        lost = (lost[:, None] + variance * options.residual[None, :]).ravel()
        picks = np.concatenate([np.repeat(picks, count, 0),
                                np.tile(np.arange(count), len(picks))[:, None]], 1)
        keep = _frontier(learnables, lost)
        picks, learnables, lost = picks[keep], learnables[keep], lost[keep]
    return picks, learnables, lost


def _residual_curve(variances: torch.Tensor, total: float | None = None) -> np.ndarray:
    """``res[r - 1] = sum_{j > r} v_j / total`` for ``r = 1..d``, ``total = sum_j v_j`` by
    default (0 when the total is zero)."""
    v = variances.detach().cpu().numpy().astype(np.float64)
    total = v.sum() if total is None else total
    if total <= 0:
        return np.zeros(len(v))
    return np.clip((v.sum() - np.cumsum(v)) / total, 0.0, 1.0)


def _all_options(res_in, res_out, count, dense: int):
    """Arrays (side code, rank_in, rank_out, learnables, residual) of every option, dense last.

    ``res_in`` and ``res_out`` are the residual curves of each side alone (``res_in`` is
    ``None`` where the input side is not analysed), ``count(rank_in, rank_out)`` the learnables
    of a factored form (``None`` for a side not projected) and ``dense`` those of the dense layer.
    """
    r_out = np.arange(1, len(res_out) + 1)
    parts = [(2, 0 * r_out, r_out, count(None, r_out), res_out)]
    if res_in is not None:
        in_c = len(res_in)
        r_in = np.arange(1, in_c + 1)
        grid_in = np.unique(np.linspace(1, in_c, min(in_c, MAX_BOTH_INPUT_RANKS)).round().astype(int))
        both_in, both_out = (a.ravel() for a in np.meshgrid(grid_in, r_out, indexing="ij"))
        parts += [(1, r_in, 0 * r_in, count(r_in, None), res_in),
                  (3, both_in, both_out, count(both_in, both_out),
                   np.minimum(res_in[both_in - 1] + res_out[both_out - 1], 1.0))]
    parts.append((0, np.zeros(1, int), np.zeros(1, int), np.array([dense]), np.zeros(1)))
    return tuple(np.concatenate([np.broadcast_to(np.asarray(p[i]), p[1].shape) for p in parts])
                 for i in range(5))


def _frontier(learnables: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """Indices of the factored options beaten by no other, learnables ascending, then dense.

    The dense option (the last of ``learnables``) always closes the frontier.
    """
    order = np.lexsort((residual, learnables))
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], residual[order]]))[:-1]
    pareto = order[residual[order] < best_before]
    dense = len(learnables) - 1
    return np.append(pareto[learnables[pareto] < learnables[dense]], dense)


# Goals --------------------------------------------------------------------------------------

def choose_by_explained_variance(options: dict[str, LayerOptions], goal: float) -> dict[str, int]:
    """Each layer's cheapest option keeping at least ``goal`` of its output variance."""
    return {name: opts.cheapest_within(1.0 - goal) for name, opts in options.items()}


@dataclass
class Allocation:
    """Result of a global allocation: the chosen option index per layer and the steps taken."""

    chosen: dict[str, int]
    goal_reached: bool
    steps: list[tuple[str, int, int]]  # (layer, learnables removed so far, option index)


def allocate_learnables_reduction(options: dict[str, LayerOptions], goal: float,
                                  network_learnables: int) -> Allocation:
    """Remove at least ``goal`` of ``network_learnables`` at the least total residual."""
    needed = math.ceil(goal * network_learnables - 1e-9)
    chosen = {name: len(opts.learnables) - 1 for name, opts in options.items()}  # all dense
    removed, steps = 0, []
    for name, saving, _, index in _hull_steps(options):
        if removed >= needed and options[name].residual[index] > LOSSLESS:
            break  # past the goal, only steps to options that lose no variance are taken
        removed += saving
        chosen[name] = index
        steps.append((name, removed, index))
    goal_reached = removed >= needed
    if goal_reached and steps:
        name = steps[-1][0]
        chosen[name] = _least_lossy_meeting(options[name], removed - _saving(options[name], chosen[name]),
                                            needed)
    return Allocation(chosen, goal_reached, steps)


def _saving(opts: LayerOptions, index: int) -> int:
    return opts.dense_learnables - int(opts.learnables[index])


def _least_lossy_meeting(opts: LayerOptions, removed_elsewhere: int, needed: int) -> int:
    """The option of least residual (then fewest learnables) meeting the goal with the others."""
    meeting = np.nonzero(removed_elsewhere + opts.dense_learnables - opts.learnables >= needed)[0]
    residual = opts.residual[meeting]
    return int(meeting[np.argmax(residual <= residual.min() + LOSSLESS)])


def _hull_steps(options: dict[str, LayerOptions]):
    """All layers' lower-convex-hull steps, sorted by residual added per learnable saved.

    Yields ``(layer, learnables saved by the step, slope, option index after the step)``.
    """
    steps = []
    for name, opts in options.items():
        savings = opts.dense_learnables - opts.learnables[::-1]   # from dense to cheapest
        residual = opts.residual[::-1]
        hull = _lower_hull(savings, residual)
        last = len(opts.learnables) - 1
        for a, b in zip(hull[:-1], hull[1:]):
            slope = (residual[b] - residual[a]) / (savings[b] - savings[a])
            steps.append((slope, name, int(savings[b] - savings[a]), last - b))
    steps.sort(key=lambda s: s[0])
    return [(name, saving, slope, index) for slope, name, saving, index in steps]


def _lower_hull(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of points sorted by ascending ``x`` (monotone chain)."""
    hull: list[int] = []
    for i in range(len(x)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (y[b] - y[a]) * (x[i] - x[a]) >= (y[i] - y[a]) * (x[b] - x[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def tradeoff_curve(options: dict[str, LayerOptions], network_learnables: int):
    """The network's trade-off between learnables removed and explained variance.

    Starting from every layer dense, the hull steps of all layers are taken in the order of
    the global allocation (least residual added per learnable saved first), so point ``k``
    is the allocation that removes ``removed[k]`` learnables at the least total residual
    reachable by whole hull steps. Its explained variance is the mean of the layers',
    weighted by their dense learnables ``L_l`` (as :attr:`ProjectionInfo.explained_variance`)::

        EV_k = 1 - sum_l L_l res_l(k) / sum_l L_l

    Parameters
    ----------
    options : dict of str to LayerOptions
        The analysed layers' frontiers (:func:`layer_options`).
    network_learnables : int
        Learnables of the whole network, the denominator of the reduction.

    Returns
    -------
    learnables_reduction : numpy.ndarray
        ``removed[k] / network_learnables``, ascending from 0 (all dense) to the maximum.
    explained_variance : numpy.ndarray
        ``EV_k``, descending from 1.
    """
    weights = {name: opts.dense_learnables for name, opts in options.items()}
    residual = dict.fromkeys(options, 0.0)
    removed, lost = [0], [0.0]
    for name, saving, _, index in _hull_steps(options):
        lost.append(lost[-1] + weights[name] * (options[name].residual[index] - residual[name]))
        residual[name] = float(options[name].residual[index])
        removed.append(removed[-1] + saving)
    total_weight = max(sum(weights.values()), 1)
    return (np.array(removed) / network_learnables,
            np.clip(1.0 - np.array(lost) / total_weight, 0.0, 1.0))


def reduction_range(npca) -> tuple[float, float]:
    """``(lossless, maximum)`` fractions of the network's learnables that projection removes."""
    options = [layer_options(npca, name) for name in npca.layer_names]
    lossless = sum(_saving(o, o.cheapest_within(0.0)) for o in options)
    maximum = sum(_saving(o, 0) for o in options)
    return lossless / npca.network_learnables, maximum / npca.network_learnables
