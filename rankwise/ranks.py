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

import numpy as np
import torch

from rankwise.learnables import dense_learnables, factored_learnables

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
        Widths of the input and output projections (``None``: side not projected).
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
    eigenvalue: rank ``r`` uses their first ``r`` columns. ``side_residuals[side][r - 1]``
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


def layer_options(npca, name: str) -> LayerOptions:
    """Enumerate and filter the options of layer ``name`` from its statistics.

    Input and both-sides options exist only where the input side was analysed (not for
    ``Linear`` layers, where output projection is optimal; see :mod:`rankwise.pca`).
    """
    stats = npca.statistics(name)
    out_spec = npca.spectrum(name, "output")
    res_out = _residual_curve(out_spec.eigenvalues)
    shape = (stats.in_channels, stats.out_channels, stats.kernel_numel)
    input_basis = input_mean = res_in = None
    if stats.input.outer is not None:
        in_spec = npca.spectrum(name, "input")
        v = in_spec.eigenvectors
        input_variance = in_spec.eigenvalues * torch.einsum("ij,ik,kj->j", v, stats.weight_gram_input, v)
        order = torch.argsort(input_variance, descending=True)
        res_in = _residual_curve(input_variance[order])
        input_basis, input_mean = v[:, order], in_spec.mean
    side, rank_in, rank_out, learnables, residual = _all_options(shape, stats.bias, res_in, res_out)
    keep = _frontier(learnables, residual)
    side_residuals = {"output": res_out} if res_in is None else {"input": res_in, "output": res_out}
    return LayerOptions(name, side[keep], rank_in[keep], rank_out[keep], learnables[keep],
                        residual[keep], input_basis, input_mean, out_spec.eigenvectors, out_spec.mean,
                        side_residuals)


def _residual_curve(variances: torch.Tensor) -> np.ndarray:
    """``res[r - 1] = sum_{j > r} v_j / sum_j v_j`` for ``r = 1..d`` (0 when all is zero)."""
    v = variances.detach().cpu().numpy().astype(np.float64)
    total = v.sum()
    if total <= 0:
        return np.zeros(len(v))
    return np.clip(1.0 - np.cumsum(v) / total, 0.0, 1.0)


def _all_options(shape, bias, res_in, res_out):
    """Arrays (side code, rank_in, rank_out, learnables, residual) of every option, dense last."""
    in_c, out_c, k = shape
    r_out = np.arange(1, out_c + 1)
    parts = [(2, 0 * r_out, r_out, factored_learnables(in_c, out_c, k, None, r_out), res_out)]
    if res_in is not None:
        r_in = np.arange(1, in_c + 1)
        grid_in = np.unique(np.linspace(1, in_c, min(in_c, MAX_BOTH_INPUT_RANKS)).round().astype(int))
        both_in, both_out = (a.ravel() for a in np.meshgrid(grid_in, r_out, indexing="ij"))
        parts += [(1, r_in, 0 * r_in, factored_learnables(in_c, out_c, k, r_in, None), res_in),
                  (3, both_in, both_out, factored_learnables(in_c, out_c, k, both_in, both_out),
                   np.minimum(res_in[both_in - 1] + res_out[both_out - 1], 1.0))]
    parts.append((0, np.zeros(1, int), np.zeros(1, int),
                  np.array([dense_learnables(in_c, out_c, k, bias)]), np.zeros(1)))
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
