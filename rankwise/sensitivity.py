"""Per-layer sensitivity: how much each layer's projection alone costs, before any training.

For every analysed layer and every explained variance goal ``g``, only that layer is
projected (the rest of the network stays dense, no fine-tuning) and the network is scored
with ``eval_fn``. A layer whose metric falls quickly as ``g`` drops projects poorly: leave it
out, or give it to :func:`rankwise.compress_incrementally` last. One :class:`NeuronPCA` serves
every probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from tqdm.auto import tqdm

from rankwise.checks import check_verbosity
from rankwise.goals import Goal
from rankwise.learnables import count_learnables
from rankwise.pca import NeuronPCA
from rankwise.projection import Decisions, build_projected, check_statistics
from rankwise.ranks import SequenceBound, choose_ranks, measured_options
from rankwise.tables import format_table
from rankwise.targets import select_layers

DEFAULT_GOALS = (0.99, 0.95, 0.9, 0.8, 0.6)


@dataclass
class SensitivityPoint:
    """The network's metric with one layer projected at one explained variance goal."""

    explained_variance_goal: float
    side: str
    rank_in: int | None
    rank_out: int | None
    layer_learnables: int
    metric: float


@dataclass
class Sensitivity:
    """Results of :func:`probe_sensitivity`: ``layers[name]`` lists one point per goal."""

    original_metric: float
    layers: dict = field(default_factory=dict)

    def metric_drop(self, name: str) -> float:
        """The largest drop of the metric below the original over the goals probed."""
        return max(self.original_metric - p.metric for p in self.layers[name])

    def rows(self) -> tuple[list, list]:
        """``(header, rows)``: layers by goals, cells ``metric (layer learnables)``."""
        goals = [p.explained_variance_goal for p in next(iter(self.layers.values()))]
        header = ["layer", *(f"ev {g:g}" for g in goals)]
        rows = [[name, *(f"{p.metric:.4f} ({p.layer_learnables:,})" for p in points)]
                for name, points in self.layers.items()]
        return header, rows

    def to_dict(self) -> dict:
        """JSON-friendly: the original metric and every point of every layer."""
        return {"original_metric": self.original_metric,
                "layers": {name: [vars(p) for p in points] for name, points in self.layers.items()}}

    def table(self) -> str:
        """Rows of layers, columns of goals: ``metric (layer learnables)``."""
        return format_table(*self.rows(), footer=f"original metric {self.original_metric:.4f}; "
                            "one layer projected at a time, no fine-tuning")

    def __str__(self) -> str:
        return self.table()


def probe_sensitivity(model: nn.Module, npca_or_data, eval_fn, *,
                      explained_variance_goals=DEFAULT_GOALS, layer_names=None,
                      verbosity: str = "summary", forward_fn=None) -> Sensitivity:
    """Project one layer at a time at several goals and measure ``eval_fn``.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network; not modified.
    npca_or_data : NeuronPCA or iterable
        Statistics, or calibration batches to compute them once.
    eval_fn : callable
        ``eval_fn(model) -> float``, higher is better.
    explained_variance_goals : sequence of float in [0, 1]
        Per-layer goals to probe.
    layer_names : list of str, optional
        Layers to probe (default: every analysed layer).
    verbosity : {"off", "summary", "steps", "iterations"}
        Progress bar and final table unless ``"off"``.
    forward_fn : callable, optional
        ``forward_fn(model, batch)`` when data is given.

    Returns
    -------
    Sensitivity
    """
    check_verbosity(verbosity)
    goals = list(explained_variance_goals)
    if not goals:
        raise ValueError("explained_variance_goals: give at least one goal in [0, 1].")
    npca = npca_or_data if isinstance(npca_or_data, NeuronPCA) else NeuronPCA(
        model, npca_or_data, layer_names=layer_names, verbosity="off", forward_fn=forward_fn, loss_fn=None,
        validation=None)
    layers = select_layers(model, npca.layer_names if layer_names is None else layer_names)
    check_statistics(npca, layers)
    options = measured_options(model, npca, layers)
    network_learnables = count_learnables(model)
    result = Sensitivity(float(eval_fn(model)))
    probes = [(name, goal) for name in layers for goal in goals]
    for name, goal in tqdm(probes, desc="sensitivity", disable=verbosity == "off"):
        probe = Goal("explained_variance", goal)
        choices, _ = choose_ranks({name: options[name]}, probe, network_learnables)
        choices = SequenceBound({name: layers[name]}, options, npca, probe)(choices)
        net, info = build_projected(model, {name: layers[name]}, options, Decisions(probe, choices))
        layer = info.layers[name]
        result.layers.setdefault(name, []).append(SensitivityPoint(
            goal, layer.side, layer.rank_in, layer.rank_out, layer.learnables_after,
            float(eval_fn(net.eval()))))
    if verbosity != "off":
        print(result.table())
    return result
