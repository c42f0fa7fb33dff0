"""Goals: each layer's option for an explained variance goal, or a global learnables or FLOPs budget.

Every layer arrives as its frontier (:mod:`rankwise.ranks.frontier`): learnables ascending,
error descending, ending at the dense layer. Its options carry a *residual* (the fraction of
the layer's output variance lost) and an *error* (the criterion's estimate,
:mod:`rankwise.ranks.criterion`; the variance criterion's error is the residual).

- ``explained_variance_goal = g``: each layer takes its cheapest option with
  ``res <= 1 - g``.
- ``flops_reduction_goal = f`` / ``latency_reduction_goal = f``: as the learnables goal below, on
  every layer's frontier priced by a cost budget (:mod:`rankwise.ranks.costs`: FLOPs or measured
  seconds in place of ``L``, error per FLOP or per second saved).
- ``learnables_reduction_goal = f``: ranks are allocated globally to minimise the sum of the
  layers' errors while removing at least ``f`` of the network's learnables ``L``,

      min_{o_l} sum_l e_l(o_l)   subject to   sum_l (L_l - L_l(o_l)) >= f L.

  Each layer's frontier is replaced by its lower convex hull in (learnables saved, error); hull
  steps of all layers are taken in order of error added per learnable saved (optimal for the
  Lagrangian relaxation ``min sum_l e_l(o_l) - t sum_l (L_l - L_l(o_l))``, every ``t``); the layer
  of the last step then takes the least lossy point of its whole frontier that still meets the
  goal. Steps that cost no error are always taken, and when the goal is above what is possible
  every layer goes to its cheapest option.
- ``allocation="uniform"`` (:func:`allocate_uniformly`): every layer keeps the same fraction
  ``k`` of its learnables, taking its least lossy option with ``L_l(o_l) <= k L_l``, with ``k``
  the largest (by bisection) that meets the goal. It ignores how the errors of different layers
  compare, which is what it is for: where those estimates are not comparable (a transformer's
  layers, whose errors compound through normalisations and residual streams), a uniform ratio
  can beat any allocation driven by them (BENCHMARKS.md measures both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rankwise.goals import Goal
from rankwise.ranks.frontier import layer_options
from rankwise.ranks.options import LOSSLESS, LayerOptions, RankChoice
from rankwise.tables import format_ranks


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
    """Remove at least ``goal`` of ``network_learnables`` at the least total error."""
    needed = math.ceil(goal * network_learnables - 1e-9)
    chosen = {name: opts.dense_index for name, opts in options.items()}  # all dense
    removed, steps = 0, []
    for name, saving, _, index in _hull_steps(options):
        if removed >= needed and options[name].error[index] > LOSSLESS:
            break  # past the goal, only steps to options that lose nothing are taken
        removed += saving
        chosen[name] = index
        steps.append((name, removed, index))
    goal_reached = removed >= needed
    if goal_reached and steps:
        name = steps[-1][0]
        chosen[name] = _least_lossy_meeting(options[name], removed - _saving(options[name], chosen[name]),
                                            needed)
    return Allocation(chosen, goal_reached, steps)


ALLOCATIONS = ("global", "uniform")
BISECTION_STEPS = 50


def allocate_uniformly(options: dict[str, LayerOptions], goal: float, network_learnables: int) -> Allocation:
    """Remove at least ``goal`` of ``network_learnables`` keeping the same fraction of every layer."""
    needed = math.ceil(goal * network_learnables - 1e-9)

    def keeping(fraction: float) -> dict[str, int]:
        return {name: int(np.nonzero(opts.learnables <= fraction * opts.dense_learnables)[0].max(initial=0))
                for name, opts in options.items()}

    def removed(chosen: dict[str, int]) -> int:
        return sum(_saving(options[name], index) for name, index in chosen.items())

    low, high = 0.0, 1.0  # removed(keeping(low)) >= needed is kept true while it can be
    if removed(keeping(low)) < needed:
        return Allocation(keeping(low), False, [])
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if removed(keeping(middle)) >= needed else (low, middle)
    return Allocation(keeping(low), True, [])


def choose_ranks(options: dict[str, LayerOptions], goal: Goal,
                 network_learnables: int, verbosity: str = "off",
                 allocation: str = "global", cost=None) -> tuple[dict[str, RankChoice], bool]:
    """Each layer's option for one goal, and whether the goal was reached.

    Parameters
    ----------
    options : dict of str to LayerOptions
        The analysed layers' frontiers.
    goal : Goal
    network_learnables : int
        Learnables of the whole network (the reduction goal's denominator).
    verbosity : str
        ``"iterations"`` prints every step of the global allocation.
    allocation : {"global", "uniform"}
        How a learnables or FLOPs reduction goal is spread over the layers (see the module
        docstring).
    cost : FlopBudget or LatencyBudget, optional
        Needed by a ``flops_reduction_goal`` or ``latency_reduction_goal``
        (:mod:`rankwise.ranks.costs`): the allocation then runs on every layer's frontier priced
        in FLOPs or measured seconds, with the network's as the denominator (the error per FLOP
        or second saved in place of the error per learnable saved).

    Returns
    -------
    choices : dict of str to RankChoice
    goal_reached : bool
    """
    if not goal.is_budget:
        chosen = choose_by_explained_variance(options, goal.value)
        return {name: options[name].choice(index) for name, index in chosen.items()}, True
    allocate = allocate_uniformly if allocation == "uniform" else allocate_learnables_reduction
    if goal.is_cost:
        if cost is None:
            raise ValueError(f"{goal.argument} needs the network's cost on an example input (cost=).")
        priced, back = cost.priced(options)
        outcome = allocate(priced, goal.value, cost.total)
        chosen = {name: int(back[name][index]) for name, index in outcome.chosen.items()}
        if verbosity == "iterations":
            _print_allocation(outcome, priced, cost.total, f"of the {cost.unit} ")
    else:
        outcome = allocate(options, goal.value, network_learnables)
        chosen = outcome.chosen
        if verbosity == "iterations":
            _print_allocation(outcome, options, network_learnables)
    return {name: options[name].choice(index) for name, index in chosen.items()}, outcome.goal_reached


def _saving(opts: LayerOptions, index: int) -> int:
    return opts.dense_learnables - int(opts.learnables[index])


def _least_lossy_meeting(opts: LayerOptions, removed_elsewhere: int, needed: int) -> int:
    """The option of least error (then fewest learnables) meeting the goal with the others."""
    meeting = np.nonzero(removed_elsewhere + opts.dense_learnables - opts.learnables >= needed)[0]
    error = opts.error[meeting]
    return int(meeting[np.argmax(error <= error.min() + LOSSLESS)])


def _hull_steps(options: dict[str, LayerOptions]):
    """All layers' lower-convex-hull steps, sorted by error added per learnable saved.

    Yields ``(layer, learnables saved by the step, slope, option index after the step)``.
    """
    steps = []
    for name, opts in options.items():
        savings = opts.dense_learnables - opts.learnables[::-1]   # from dense to cheapest
        error = opts.error[::-1]
        hull = _lower_hull(savings, error)
        last = opts.dense_index
        for a, b in zip(hull[:-1], hull[1:]):
            slope = (error[b] - error[a]) / (savings[b] - savings[a])
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
    the global allocation (least error added per learnable saved first), so point ``k``
    is the allocation that removes ``removed[k]`` learnables at the least total error
    reachable by whole hull steps. Its explained variance is the mean of the layers',
    weighted by their dense learnables ``L_l`` (as :attr:`ProjectionInfo.explained_variance`)::

        EV_k = 1 - sum_l L_l res_l(k) / sum_l L_l

    Parameters
    ----------
    options : dict of str to LayerOptions
        The analysed layers' frontiers (:func:`~rankwise.ranks.frontier.layer_options`).
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


def unreached_goal(goal: Goal, goal_reached: bool, options: dict, network_learnables: int,
                   cost=None, kept_dense=()) -> list[str]:
    """``[message]`` naming the maximum when a reduction goal could not be reached, else ``[]``;
    ``options`` are the layers decided on, ``kept_dense`` those left out of them because their
    projected form was not faster (:mod:`rankwise.latency_aware`)."""
    if goal_reached:
        return []
    if goal.is_cost:
        priced, _ = cost.priced(options)
        most, unit = most_removable(priced) / cost.total, cost.unit
    else:
        most, unit = most_removable(options) / network_learnables, "learnables"
    if kept_dense:
        return [f"{goal} is above what the layers left once {', '.join(kept_dense)} were kept dense (not "
                f"faster on latency_input) can remove ({most:.2%} of the network's {unit}, every one at its "
                "smallest useful form); they keep the forms first chosen for them, not their smallest"]
    return [f"{goal} is above what projection can remove from these layers "
            f"({most:.2%} of the network's {unit}, every layer at its smallest useful form); "
            "that maximum was removed"]


def most_removable(options: dict[str, LayerOptions]) -> int:
    """Learnables removed with every layer at its cheapest option (the reduction's maximum)."""
    return sum(_saving(o, 0) for o in options.values())


def reduction_range(npca) -> tuple[float, float]:
    """``(lossless, maximum)`` fractions of the network's learnables that projection removes."""
    options = {name: layer_options(npca, name) for name in npca.layer_names}
    lossless = sum(_saving(o, o.cheapest_within(0.0)) for o in options.values())
    return lossless / npca.network_learnables, most_removable(options) / npca.network_learnables


def _print_allocation(allocation: Allocation, options: dict, network_total: int, unit: str = "") -> None:
    """One line per step: the layer, its option and the share of ``network_total`` removed so far."""
    for step, (name, removed, index) in enumerate(allocation.steps, start=1):
        choice = options[name].choice(index)
        print(f"allocation step {step}: {name} -> {choice.side} (rank in {format_ranks(choice.rank_in)}, "
              f"rank out {format_ranks(choice.rank_out)}), {removed / network_total:.2%} {unit}removed")
