"""Layer-by-layer compression: project one layer, fine-tune, keep it or roll it back.

One-shot projection of a whole network stacks every layer's error before any training can
absorb it. :func:`compress_incrementally` instead walks the layers (largest first by default):

1. recompute the statistics of the layers not yet visited on the *current* network (their
   inputs changed with every projected and fine-tuned layer upstream);
2. choose the rank of the next layer: with a ``learnables_reduction_goal`` (or a
   ``flops_reduction_goal``, FLOPs counted on ``flops_input`` for the current network,
   :func:`rankwise.flops.flop_budget`) by the global allocation of :mod:`rankwise.ranks` over
   the layers not yet visited, for what is still to be removed; with an
   ``explained_variance_goal`` by that goal;
3. project that layer, fine-tune the whole network (:func:`rankwise.train.fine_tune`; with
   ``recovery=`` a method of :func:`rankwise.recover` instead: distillation from the original
   network, kept only when it improves the held-out score) and evaluate it with ``eval_fn``
   (higher is better);
4. keep the step if the metric is at least ``original - tolerance``; otherwise roll back to
   the network before the step, bit for bit, and list the layer in ``skipped_layers`` as
   poorly projectable. Later steps make up for the learnables a skipped layer did not give.

It stops once a learnables or FLOPs goal is met.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

from torch import nn

from rankwise.learnables import count_learnables
from rankwise.checks import check_verbosity
from rankwise.flops import flop_budget
from rankwise.goals import Goal, check_goals
from rankwise.pca import NeuronPCA
from rankwise.projection import Decisions, build_projected
from rankwise.ranks import RankChoice, SequenceBound, choose_ranks, measured_options
from rankwise.tables import format_ranks, format_table
from rankwise.targets import select_layers
from rankwise.recovery import RecoveryRecord, recover
from rankwise.train import FineTuneHistory, fine_tune

ORDERS = ("largest-first", "model-order", "reverse-model-order")


@dataclass
class IncrementalStep:
    """One projected layer: what was done, what it cost, whether it was kept."""

    layer: str
    side: str
    rank_in: int | None
    rank_out: int | None
    layer_learnables_before: int
    layer_learnables_after: int
    network_learnables: int
    metric_before_fine_tune: float
    metric_after_fine_tune: float
    kept: bool
    seconds: float
    fine_tune: FineTuneHistory | RecoveryRecord


@dataclass
class IncrementalHistory:
    """Every step of :func:`compress_incrementally`, and the outcome.

    ``network_learnables`` of a step is the network's size after it (after the roll-back
    when the step was not kept). ``flops_before`` / ``flops_after``: under a
    ``flops_reduction_goal``, the network's FLOPs on ``flops_input`` before and after.
    """

    original_metric: float
    original_learnables: int
    tolerance: float
    goal: Goal
    steps: list = field(default_factory=list)
    goal_reached: bool = True
    flops_before: int | None = None
    flops_after: int | None = None

    @property
    def skipped_layers(self) -> list[str]:
        """Layers whose projection lost more than ``tolerance``: poorly projectable."""
        return [s.layer for s in self.steps if not s.kept]

    @property
    def projected_layers(self) -> list[str]:
        return [s.layer for s in self.steps if s.kept]

    @property
    def final_learnables(self) -> int:
        return self.steps[-1].network_learnables if self.steps else self.original_learnables

    @property
    def learnables_reduction(self) -> float:
        return 1.0 - self.final_learnables / self.original_learnables

    def table(self) -> str:
        """One line per step: layer, ranks, learnables, metric before/after fine-tuning."""
        header = ("layer", "side", "ranks", "layer learnables", "network", "metric (no FT)",
                  "metric (FT)", "kept", "s")
        rows = [(s.layer, s.side, f"{format_ranks(s.rank_in)} | {format_ranks(s.rank_out)}",
                 f"{s.layer_learnables_before:,} -> {s.layer_learnables_after:,}",
                 f"{s.network_learnables:,}", f"{s.metric_before_fine_tune:.4f}",
                 f"{s.metric_after_fine_tune:.4f}", "yes" if s.kept else "rolled back",
                 f"{s.seconds:.1f}") for s in self.steps]
        return format_table(header, rows, footer=(
            f"original metric {self.original_metric:.4f}, tolerance {self.tolerance:g}; "
            f"{self.original_learnables:,} -> {self.final_learnables:,} learnables "
            f"({self.learnables_reduction:.1%} removed), {self.goal}"
            + ("" if self.flops_before is None else
               f"; FLOPs {self.flops_before:,} -> {self.flops_after:,} "
               f"({1 - self.flops_after / self.flops_before:.1%} removed)")
            + ("" if self.goal_reached else " (not reached)")
            + (f"; skipped: {', '.join(self.skipped_layers)}" if self.skipped_layers else "")))

    def __str__(self) -> str:
        return self.table()

    def plot(self, path=None):
        """Metric before/after fine-tuning and network learnables after each step.

        Returns the matplotlib figure; also writes it to ``path`` when given.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, (metric_axes, size_axes) = plt.subplots(1, 2, figsize=(10, 3.5))
        steps = range(1, len(self.steps) + 1)
        metric_axes.axhline(self.original_metric, color="grey", ls="--", label="original")
        metric_axes.axhline(self.original_metric - self.tolerance, color="grey", ls=":",
                            label="original - tolerance")
        metric_axes.plot(steps, [s.metric_before_fine_tune for s in self.steps], "o-", label="projected")
        metric_axes.plot(steps, [s.metric_after_fine_tune for s in self.steps], "s-", label="fine-tuned")
        metric_axes.set(xlabel="step", ylabel="metric", title="metric per step")
        metric_axes.legend()
        size_axes.plot([0, *steps], [self.original_learnables, *(s.network_learnables for s in self.steps)], "o-")
        size_axes.set(xlabel="step", ylabel="learnables", title="network learnables")
        figure.tight_layout()
        if path is not None:
            figure.savefig(path, dpi=100)
        return figure


def compress_incrementally(model: nn.Module, data, *, train_data, eval_fn,
                           learnables_reduction_goal: float | None = None,
                           explained_variance_goal: float | None = None,
                           flops_reduction_goal: float | None = None, flops_input=None, tolerance: float = 0.01,
                           fine_tune_epochs: int = 1, order="largest-first", layer_names=None,
                           exclude=None, val_data=None, teacher: nn.Module | None = None, lr: float | None = None,
                           verbosity: str = "summary", forward_fn=None, recovery: str | None = None,
                           batchnorm: str = "auto"):
    """Project layer by layer with fine-tuning in between, rolling back layers that hurt.

    See the module docstring for the procedure.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network; not modified.
    data : iterable
        Calibration batches (as for :class:`NeuronPCA`), re-run at every step.
    train_data : iterable
        Fine-tuning batches ``(inputs, targets)`` (inputs alone with ``teacher``).
    eval_fn : callable
        ``eval_fn(model) -> float``, higher is better (e.g. validation accuracy).
    learnables_reduction_goal, explained_variance_goal, flops_reduction_goal : float in [0, 1], optional
        As in :func:`compress_network_using_projection` (exclusive; default explained
        variance 0.95).
    flops_input : torch.Tensor, tuple, list or dict, optional
        The example batch a ``flops_reduction_goal`` counts FLOPs on (default: the first batch
        of ``data``), run as a calibration batch is.
    tolerance : float
        Largest drop of ``eval_fn`` below the original's that a step may cause.
    fine_tune_epochs : int
        Epochs of fine-tuning after each projected layer.
    order : {"largest-first", "model-order", "reverse-model-order"} or list of str
        The order of the layers; a list gives it explicitly.
    layer_names : list of str, optional
        Only these layers are candidates.
    exclude : str or list of str, optional
        Layers that are never candidates.
    val_data : iterable, optional
        Validation batches for the fine-tuning (best weights, early stop).
    teacher : torch.nn.Module, optional
        Fine-tune by distillation from this model (e.g. ``model`` itself).
    lr : float, optional
        Fine-tuning learning rate.
    verbosity : {"off", "summary", "steps", "iterations"}
    forward_fn : callable, optional
        ``forward_fn(model, batch)`` for the calibration passes (and recovery's).
    recovery : {"logits", "features", "lora"}, optional
        Recover each step with :func:`rankwise.recover` (distillation from ``model`` on
        ``train_data``, validated on ``val_data`` or, without it, on every 4th batch of
        ``train_data``; never worse) instead of :func:`rankwise.fine_tune`; exclusive with
        ``teacher``.
    batchnorm : {"auto", "frozen", "reestimate", "train"}
        What the BatchNorms do while fine-tuning or recovering (:mod:`rankwise.batchnorm_modes`).

    Returns
    -------
    model : torch.nn.Module
        The compressed, fine-tuned network (a new object).
    history : IncrementalHistory
    """
    check_verbosity(verbosity)
    goal = check_goals(explained_variance_goal, learnables_reduction_goal, flops_reduction_goal)
    if goal.kind == "flops_reduction" and flops_input is None:
        flops_input = next(iter(data), None)
        if flops_input is None:
            raise ValueError("flops_input: a flops_reduction_goal counts FLOPs on an example batch and data "
                             "has no batch; pass calibration batches, or flops_input=<one batch as deployed>.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or tolerance < 0:
        raise ValueError(f"tolerance: expected a number >= 0, got {tolerance!r}.")
    if recovery is not None and teacher is not None:
        raise ValueError("teacher and recovery are exclusive: recovery distils from model itself; "
                         "drop teacher=.")
    names = _ordered(model, layer_names, exclude, order)
    network = copy.deepcopy(model).eval()
    size = lambda network, layers: _size(goal, network, layers, flops_input, forward_fn)  # noqa: E731
    history = IncrementalHistory(float(eval_fn(network)), count_learnables(model), tolerance, goal)
    original_size = size(network, {})[0]
    needed = math.ceil(goal.value * original_size - 1e-9)
    for position, name in enumerate(names):
        candidates = {n: network.get_submodule(n) for n in (names[position:] if goal.is_budget else [name])}
        current_size, cost = size(network, candidates)
        if goal.is_budget and original_size - current_size >= needed:
            break
        step_start = time.perf_counter()
        npca = NeuronPCA(network, data, layer_names=names[position:], verbosity="off",
                         forward_fn=forward_fn, loss_fn=None, validation=None)
        options = measured_options(network, npca, candidates)
        choice = _choice(options, name, goal, current_size, needed - (original_size - current_size), cost)
        choice = SequenceBound({name: network.get_submodule(name)}, options, npca, goal)(
            {name: choice})[name]
        if choice.side == "dense":
            continue
        candidate, info = build_projected(network, {name: network.get_submodule(name)}, options,
                                          Decisions(history.goal, {name: choice}))
        recovery_step = None if recovery is None else dict(
            original=model, method=recovery, validation="auto" if val_data is None else val_data,
            forward_fn=forward_fn)
        step = _fine_tune_step(candidate, info.layers[name], history, train_data, val_data,
                               eval_fn, fine_tune_epochs, teacher, lr, verbosity, batchnorm, recovery_step)
        network = candidate if step.kept else network
        step.network_learnables = count_learnables(network)
        step.seconds = time.perf_counter() - step_start
        history.steps.append(step)
        if verbosity in ("steps", "iterations"):
            print(history.table().splitlines()[len(history.steps) + 1].rstrip())
    if goal.is_budget:
        final_size = size(network, {})[0]
        history.goal_reached = original_size - final_size >= needed
        if goal.kind == "flops_reduction":
            history.flops_before, history.flops_after = original_size, final_size
    if verbosity != "off":
        print(history.table())
    return network, history


def _ordered(model: nn.Module, layer_names, exclude, order) -> list[str]:
    layers = select_layers(model, layer_names, exclude=exclude)
    if isinstance(order, list | tuple):
        unknown = [n for n in order if n not in layers]
        if unknown or len(set(order)) != len(order):
            raise ValueError(f"order: give each of the layers {', '.join(layers)} at most once; "
                             f"not candidates: {', '.join(unknown) or 'none'}.")
        return list(order)
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {', '.join(ORDERS)} or a list of layer names, "
                         f"got {order!r}.")
    names = list(layers)
    if order == "largest-first":
        return sorted(names, key=lambda n: -count_learnables(layers[n]))  # stable: model order on ties
    return names if order == "model-order" else names[::-1]


def _size(goal: Goal, network: nn.Module, layers: dict, flops_input, forward_fn):
    """``(size, cost)``: the network's FLOPs on ``flops_input`` and the FlopBudget of ``layers``
    under a FLOPs goal, else its learnables and ``None``."""
    if goal.kind != "flops_reduction":
        return count_learnables(network), None
    budget = flop_budget(network, layers, flops_input, "flops_input", forward_fn=forward_fn)
    return budget.network_flops, budget


def _choice(options: dict, name: str, goal: Goal, current_size: int, still_needed: int, cost) -> RankChoice:
    """Layer ``name``'s option: by the explained variance goal, or the one the global allocation
    over ``options`` (the layers not yet visited) gives it for what is still to be removed,
    ``still_needed / S_current`` of the current network's size ``S`` (learnables or FLOPs;
    ``"dense"`` when it keeps the layer dense)."""
    if goal.is_budget:
        goal = Goal(goal.kind, min(1.0, max(0.0, still_needed / current_size)))
    return choose_ranks(options, goal, current_size, cost=cost)[0][name]


def _fine_tune_step(candidate, projection, history, train_data, val_data, eval_fn, epochs,
                    teacher, lr, verbosity, batchnorm, recovery_step) -> IncrementalStep:
    metric_before = float(eval_fn(candidate.eval()))
    if recovery_step is None:
        tuned = fine_tune(candidate, train_data, epochs=epochs, val_data=val_data, teacher=teacher,
                          lr=lr, progress=verbosity != "off", batchnorm=batchnorm)
    else:
        tuned = recover(candidate, data=train_data, epochs=epochs, lr=lr, batchnorm=batchnorm,
                        progress=verbosity != "off", **recovery_step)
    metric_after = float(eval_fn(candidate.eval()))
    return IncrementalStep(projection.name, projection.side, projection.rank_in, projection.rank_out,
                           projection.learnables_before, projection.learnables_after, 0,
                           metric_before, metric_after,
                           metric_after >= history.original_metric - history.tolerance, 0.0, tuned)
