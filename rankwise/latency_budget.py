"""The cost budget of a latency goal: every option priced in measured seconds, and the measured check.

A ``latency_reduction_goal = f`` asks for at least ``f`` of the network's latency on
``latency_input`` removed, as :func:`rankwise.compare_speed` measures it: on the user's device,
batch size and thread count. The allocation is that of a learnables goal
(:mod:`rankwise.ranks.allocation`) on every layer's frontier priced in seconds, so layers are
compressed in the order of estimated error added per second saved.

**Pricing** (:class:`LatencyBudget`). Timing every option of every layer would take thousands of
measurements, so each layer is timed a few times, in isolation, on the arguments it received
when the model ran on ``latency_input`` (:func:`rankwise.latency_aware.record_layer_calls`;
:func:`rankwise.median_latency`: median of 20 calls after 3 warm-up calls):

- dense, ``t_dense`` (a tied token table: its lookup plus its output head,
  :func:`rankwise.latency_aware.form_seconds`);
- for each side of its frontier (input, output, both projected; for a recurrent or attention
  layer, each combination of its cells' or parts' sides), its cheapest and its largest
  option and those whose learnables are nearest to the fractions :data:`SAMPLE_FRACTIONS` of
  the dense layer's, built as they will be built (:func:`rankwise.layers.build.project_layer`).

Every other option of a side is priced by linear interpolation of seconds in learnables between
the timed options of that side: for one side a factored layer runs the
same kernels at every rank, whose work grows with the ranks as its learnables do. Prices are
then rounded to a grid of :data:`TIMING_RESOLUTION` ``x t_dense``: differences below it are
noise, and, on a frontier, the least lossy option of each step of the grid is kept, so a layer
is not cut to a lower rank that saves no time that can be measured (at batch 1 a small
``Linear`` runs as fast at rank 1 as at rank 20). Options priced at ``t >= t_dense`` leave the
frontier (:func:`rankwise.ranks.costs.cheaper_frontier`): a latency goal never makes a layer
slower by its own estimate. The network's total is its
median latency on ``latency_input``; seconds outside the analysed layers (activations,
normalisations, attention products) count in the total but cannot be saved. Timings are kept
by shape, so the candidates of a measured choice (:mod:`rankwise.selection`) and the rounds below
share them.

**The measured check** (:func:`meet_latency_goal`). Layers timed alone do not add up to the
network (caches, memory traffic, kernel launches), so after each decision the compressed network
is built and compared with the original by :func:`rankwise.compare_speed` (alternating rounds
until the medians settle). Round ``k`` decides at target ``g_k`` (``g_1 = f``) and measures the
reduction ``a_k = 1 - t_compressed / t_original``; while ``a_k < f`` the target is raised by the
shortfall, ``g_{k+1} = min(1, g_k + f - a_k)``, for at most :data:`MEASURED_ROUNDS` rounds.
The first round reaching ``f`` is kept, else the one with the largest measured reduction, with a
warning naming it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from torch import nn
from tqdm import tqdm

from rankwise import latency
from rankwise.goals import Goal
from rankwise.latency_aware import form_seconds
from rankwise.progress import PROGRESS_DELAY_SECONDS
from rankwise.ranks.costs import priced_frontiers
from rankwise.ranks.options import LayerOptions

SAMPLE_FRACTIONS = (0.25, 0.5, 0.75)
"""Learnables (fractions of the dense layer's) of the options timed per layer and side, besides
the side's cheapest and largest."""
TIMING_RESOLUTION = 0.05
"""Prices are rounded to this fraction of the layer's dense seconds (the spread of median timings
on a busy machine)."""
MEASURED_ROUNDS = 3
"""Decisions built and measured at most, the target raised by the shortfall after each."""


class LatencyBudget:
    """The network's latency on one input and its layers' options priced in measured seconds.

    Made by :func:`latency_budget`; read by :func:`rankwise.ranks.choose_ranks` under a
    ``latency_reduction_goal`` (see the module docstring for how options are priced). Costs are
    integer nanoseconds, as the allocation counts learnables.

    Attributes
    ----------
    network_seconds : float
        Median latency of the whole network on ``latency_input``.
    timings : dict
        Seconds measured so far, by ``(layer, side, rank_in, rank_out)`` (``side`` ``"dense"``
        with ranks ``None`` for the dense layer).
    """

    unit = "measured latency"

    def __init__(self, model: nn.Module, layers: dict, calls: dict, network_seconds: float, unpack: bool = False,
                 progress: bool = False):
        self.model, self.layers, self.calls, self.unpack, self.progress = model, layers, calls, unpack, progress
        self.network_seconds = network_seconds
        self.timings: dict[tuple, float] = {}

    @property
    def total(self) -> int:
        """The network's latency in nanoseconds: the goal's denominator."""
        return int(_nanoseconds(self.network_seconds))

    def priced(self, options: dict[str, LayerOptions]):
        """Every layer's frontier in nanoseconds, and the map back to the options' own indices
        (as :meth:`rankwise.ranks.costs.FlopBudget.priced`)."""
        names = tqdm(options, desc="timing layer forms", unit="layer", delay=PROGRESS_DELAY_SECONDS,
                     leave=False, disable=not self.progress)
        return priced_frontiers(options, self._grid_nanoseconds, names)

    def _grid_nanoseconds(self, options: LayerOptions) -> np.ndarray:
        """:meth:`option_seconds` on the grid of :data:`TIMING_RESOLUTION` ``x t_dense``, in nanoseconds."""
        seconds = self.option_seconds(options)
        step = TIMING_RESOLUTION * seconds[-1]
        return _nanoseconds(np.round(seconds / step) * step)

    def option_seconds(self, options: LayerOptions) -> np.ndarray:
        """Estimated seconds of every option of ``options`` (dense last, measured)."""
        seconds = np.empty(len(options.learnables))
        seconds[-1] = self._measure(options, options.dense_index)
        if len(seconds) == 1:  # the dense option only
            return seconds
        sides = options.side[:-1].reshape(len(seconds) - 1, -1)  # a row per option (per cell: recurrent)
        group = np.unique(sides, axis=0, return_inverse=True)[1].ravel()
        for code in np.unique(group):
            of_side = np.nonzero(group == code)[0]
            timed = self._sampled(options, of_side)
            measured = np.array([self._measure(options, index) for index in timed])
            seconds[of_side] = np.interp(options.learnables[of_side], options.learnables[timed], measured)
        return seconds

    def _sampled(self, options: LayerOptions, of_side: np.ndarray) -> np.ndarray:
        """The cheapest and largest options of one side and those nearest to
        :data:`SAMPLE_FRACTIONS` of the dense learnables, learnables ascending."""
        learnables = options.learnables[of_side]
        targets = np.array([learnables.min(), *np.array(SAMPLE_FRACTIONS) * options.dense_learnables,
                            learnables.max()])
        nearest = np.abs(learnables[None, :] - targets[:, None]).argmin(axis=1)
        timed = np.unique(of_side[nearest])
        return timed[np.argsort(options.learnables[timed], kind="stable")]

    def _measure(self, options: LayerOptions, index: int) -> float:
        choice = options.choice(index)
        key = (options.name, choice.side, choice.rank_in, choice.rank_out)
        if key not in self.timings:
            self.timings[key] = form_seconds(self.model, options.name, self.layers[options.name], options, choice,
                                             self.calls, self.unpack)
        return self.timings[key]


def latency_budget(model: nn.Module, layers: dict, calls: dict, latency_input, unpack: bool = False,
                   progress: bool = False) -> LatencyBudget:
    """The :class:`LatencyBudget` of ``model`` on ``latency_input`` (its median latency measured
    now; the layers' forms timed when first priced)."""
    return LatencyBudget(model, layers, calls, latency.median_latency(model, latency_input), unpack, progress)


def check_latency_goal(goal: Goal, latency_input) -> None:
    """A latency goal needs ``latency_input``, the batch it is measured on."""
    if goal.kind == "latency_reduction" and latency_input is None:
        raise ValueError("latency_reduction_goal: the latency is measured, so it needs latency_input=, an "
                         "example batch at the batch size and on the device you deploy to (e.g. one "
                         "calibration batch), with the model on that device.")


def meet_latency_goal(goal: Goal, decide, build, model: nn.Module, latency_input, verbosity: str = "off"):
    """Decide, build and measure until the measured latency reduction reaches ``goal``.

    Parameters
    ----------
    goal : Goal
        A ``latency_reduction`` goal.
    decide : callable
        ``decide(goal) -> (choices, goal_reached, ...)``: the decisions at a (raised) target.
    build : callable
        ``build(choices) -> model``: the compressed network those choices make.
    model : torch.nn.Module
        The original network.
    latency_input
        The batch both networks are timed on.
    verbosity : str
        Anything but ``"off"`` prints each round's target and measurement.

    Returns
    -------
    outcome : tuple
        ``decide``'s return for the kept round, ``goal_reached`` set to whether its measured
        reduction reaches the goal.
    comparison : SpeedComparison
        The kept round's measurement.
    warnings : list of str
        One message when the goal was not reached as measured.
    """
    target, rounds = goal.value, []
    for round_number in range(1, MEASURED_ROUNDS + 1):
        outcome = decide(dataclasses.replace(goal, value=target))
        comparison = _measured(model, outcome[0], build, latency_input)
        achieved = 1.0 - comparison.seconds_after / comparison.seconds_before
        rounds.append((achieved, outcome, comparison))
        if verbosity != "off":
            print(f"latency round {round_number}: target {target:.1%}, measured {achieved:.1%} removed "
                  f"({latency.format_seconds(comparison.seconds_before)} -> "
                  f"{latency.format_seconds(comparison.seconds_after)})")
        if achieved >= goal.value or not outcome[1] or target >= 1.0:
            break
        target = min(1.0, target + goal.value - achieved)
    achieved, outcome, comparison = next((r for r in rounds if r[0] >= goal.value), max(rounds, key=lambda r: r[0]))
    reached = achieved >= goal.value
    message = [] if reached else [_unreached(goal, achieved, len(rounds), outcome[0], outcome[1])]
    return (outcome[0], reached, *outcome[2:]), comparison, message


def _measured(model: nn.Module, choices: dict, build, latency_input) -> latency.SpeedComparison:
    """The compressed network of ``choices`` against ``model`` (:func:`rankwise.compare_speed`);
    when every layer stays dense the network is the original, and its one latency is both."""
    if any(choice.side != "dense" for choice in choices.values()):
        return latency.compare_speed(model, build(choices), latency_input)
    seconds = latency.median_latency(model, latency_input)
    return latency.SpeedComparison(0, 0, seconds, seconds)


def _unreached(goal: Goal, achieved: float, rounds: int, choices: dict, allocated: bool) -> str:
    if all(choice.side == "dense" for choice in choices.values()):
        return (f"{goal} was not reached: no layer's projected form is faster than its dense form on "
                "latency_input (at this batch size and on this device), so every layer was kept dense.")
    why = ("the layers that remain cannot be made faster by projection at this batch size, or timings on "
           "this machine are too noisy" if allocated else
           "the goal is above what the layers' timed forms can save, so every layer took its fastest form, "
           "which can cost much accuracy: check it, or ask for less")
    return (f"{goal} was not reached as measured: {achieved:.1%} of the latency on latency_input removed "
            f"(best of {rounds} round(s) of decisions built and timed with compare_speed); {why}. "
            "That compression was kept.")


def _nanoseconds(seconds):
    return np.round(np.asarray(seconds) * 1e9).astype(np.int64)

