"""analyze: how far each layer of a network can be compressed by projection, and why not.

Counterpart of MATLAB's *Analyze for Compression*. From one :class:`~rankwise.NeuronPCA`,
without recomputing its statistics, the report gathers:

- per layer: its type and learnables, whether it can be projected (and why not), the
  learnables of its smallest and of its lossless factored forms, and for each analysed side
  the explained variance of projecting that side alone at rank ``r``,
  ``EV_side(r) = 1 - res_side(r)`` (see :mod:`rankwise.ranks`), with the eigenvalues behind it;
- per goal: what :func:`~rankwise.compress_network_using_projection` would do, as the
  :class:`~rankwise.ProjectionInfo` it would return (side, ranks, learnables and explained
  variance of every layer), without building the compressed model;
- for the network: the trade-off curve of learnables removed against explained variance
  (:func:`rankwise.ranks.tradeoff_curve`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

from rankwise.kinds import kind_of
from rankwise.forms import is_form, outermost
from rankwise.learnables import count_learnables
from rankwise.batches import as_batches
from rankwise.checks import check_fraction, check_verbosity
from rankwise.flops import flop_budget, flops_example
from rankwise.goals import Goal
from rankwise.pca import NeuronPCA
from rankwise.projection import Decisions, ProjectionInfo, build_projected, check_statistics, unreached_goal
from rankwise.ranks import LayerOptions, SequenceBound, choose_ranks, measured_options, tradeoff_curve
from rankwise.report.html import report_tables_html, write_html
from rankwise.report.serialize import report_to_dict, write_json
from rankwise.report.table import report_table, summary_line
from rankwise.sensitivity import Sensitivity, probe_sensitivity
from rankwise.targets import (excluded_layers, select_layers, tie_warnings, tied_layers, tied_left_out,
                              why_not_projectable)

DEFAULT_EXPLAINED_VARIANCE_GOALS = (0.9, 0.95, 0.99)
DEFAULT_LEARNABLES_REDUCTION_GOALS = (0.5, 0.8, 0.9)


@dataclass(frozen=True)
class SideSpectrum:
    """One analysed side (``"input"`` or ``"output"``) of one layer.

    Attributes
    ----------
    eigenvalues : numpy.ndarray
        Eigenvalues of the side's regularised covariance, descending.
    explained_variance : numpy.ndarray
        ``explained_variance[r - 1]``: fraction of the layer's *output* variance kept when
        only this side is projected, at rank ``r`` (input directions ranked by the output
        variance they carry, ``lambda_j |W q_j|^2``).
    """

    eigenvalues: np.ndarray
    explained_variance: np.ndarray


@dataclass(frozen=True)
class LayerReport:
    """What the analysis says about one layer.

    Attributes
    ----------
    name : str
        Qualified module name.
    type : str
        Class name of the module (``"Linear"``, ``"Conv2d"``, ``"BatchNorm2d"``, ...).
    learnables : int
        Learnables the module holds itself (a projected wrapper: all of its parts).
    projectable : bool
        Whether projection can replace this module.
    reason : str or None
        Why it cannot be projected, or why a projectable layer was not analysed.
    min_learnables, lossless_learnables : int or None
        Learnables of its smallest factored form, and of its smallest form that loses no
        variance (the dense layer when none is smaller); ``None`` when not analysed.
    sides : dict of str to SideSpectrum
        The analysed sides (a ``Linear`` layer: the output only; an LSTM / GRU of one cell: its
        input and its hidden state). Empty for a layer not analysed, and for an LSTM / GRU of
        several cells (stacked layers, directions), whose ranks are chosen per cell.
    """

    name: str
    type: str
    learnables: int
    projectable: bool
    reason: str | None
    min_learnables: int | None = None
    lossless_learnables: int | None = None
    sides: dict = field(default_factory=dict)

    @property
    def analysed(self) -> bool:
        return self.min_learnables is not None

    @property
    def max_reduction(self) -> float | None:
        """Largest fraction of the layer's learnables that projection removes."""
        return None if not self.analysed else 1.0 - self.min_learnables / self.learnables

    @property
    def lossless_reduction(self) -> float | None:
        """Fraction of the layer's learnables that goes without losing any variance."""
        return None if not self.analysed else 1.0 - self.lossless_learnables / self.learnables


@dataclass(frozen=True)
class AnalysisReport:
    """Outcome of :func:`analyze`.

    Attributes
    ----------
    network_learnables : int
    layers : dict of str to LayerReport
        Every module that holds learnables or could be projected, in model order.
    goals : dict of str to ProjectionInfo
        What each goal would give, keyed like ``"explained_variance_goal=0.95"``.
    tradeoff_reduction, tradeoff_explained_variance : numpy.ndarray
        The network's trade-off curve: fraction of the learnables removed (ascending) and
        learnables-weighted explained variance of the analysed layers (descending).
    sensitivity : Sensitivity or None
        With ``eval_fn``: the metric with each layer projected alone, before any training
        (:func:`rankwise.probe_sensitivity`).
    """

    network_learnables: int
    layers: dict
    goals: dict
    tradeoff_reduction: np.ndarray
    tradeoff_explained_variance: np.ndarray
    sensitivity: Sensitivity | None = None

    @property
    def analysed_layers(self) -> list[str]:
        return [name for name, layer in self.layers.items() if layer.analysed]

    @property
    def learnables_reduction_range(self) -> tuple[float, float]:
        """``(lossless, maximum)`` fractions of the network's learnables projection removes."""
        analysed = [self.layers[name] for name in self.analysed_layers]
        lossless = sum(layer.learnables - layer.lossless_learnables for layer in analysed)
        maximum = sum(layer.learnables - layer.min_learnables for layer in analysed)
        return lossless / self.network_learnables, maximum / self.network_learnables

    def table(self) -> str:
        """Terminal tables: the goals' outcomes, then every layer (see :mod:`.table`)."""
        return report_table(self)

    def to_dict(self) -> dict:
        """A JSON-friendly description (see :mod:`.serialize` for the fields)."""
        return report_to_dict(self)

    def to_json(self, path) -> None:
        """Write :meth:`to_dict` to ``path`` as JSON."""
        write_json(self, path)

    def to_html(self, path, title: str = "rankwise analysis") -> None:
        """Write one self-contained HTML page: tables and plots (needs matplotlib)."""
        write_html({title: self}, path)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        """One line: the summary of the network (:func:`.table.summary_line`) and the goals."""
        return f"<AnalysisReport {summary_line(self)}; {len(self.goals)} goals; print(report) for the tables>"

    def _repr_html_(self) -> str:
        """The goals and layers tables, for notebooks (the plots: :meth:`to_html`)."""
        return report_tables_html(self)


def analyze(model: nn.Module, npca_or_data, *, layer_names=None, exclude=None,
            explained_variance_goals=DEFAULT_EXPLAINED_VARIANCE_GOALS,
            learnables_reduction_goals=DEFAULT_LEARNABLES_REDUCTION_GOALS, flops_reduction_goals=(),
            flops_input=None, verbosity: str = "summary", forward_fn=None, eval_fn=None,
            criterion: str = "variance") -> AnalysisReport:
    """Analyse how far each layer of ``model`` can be compressed by projection.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network. It is not modified.
    npca_or_data : NeuronPCA or iterable
        Statistics computed by :class:`NeuronPCA` (used as they are), or calibration batches
        to compute them.
    layer_names : str or list of str, optional
        Analyse only these layers. By default every projectable layer (with a NeuronPCA:
        every projectable layer it holds statistics of).
    exclude : str or list of str, optional
        Leave these layers out of the analysis (each goal's info lists them as excluded).
    explained_variance_goals, learnables_reduction_goals : sequence of float in [0, 1]
        Goals whose outcome the report gives, as
        :func:`~rankwise.compress_network_using_projection` would reach them.
    flops_reduction_goals : sequence of float in [0, 1]
        FLOPs goals, counted on ``flops_input`` (default: the NeuronPCA's first held-out batch,
        or the first batch of the data given).
    flops_input : torch.Tensor, tuple, list or dict, optional
        The example batch of ``flops_reduction_goals``.
    verbosity : {"off", "summary", "steps", "iterations"}
        ``"off"`` prints nothing; otherwise the report's table is printed.
    forward_fn : callable, optional
        ``forward_fn(model, batch)``, used when data is given (see :class:`NeuronPCA`).
    eval_fn : callable, optional
        ``eval_fn(model) -> float`` (higher is better). When given, every analysed layer is
        also projected alone at each explained variance goal and the network scored, so the
        report shows which layers project poorly before any training time is spent.
    criterion : {"variance", "loss"}
        How options are judged, as in :func:`~rankwise.compress_network_using_projection`.

    Returns
    -------
    AnalysisReport
    """
    check_verbosity(verbosity)
    goals = (_check_goals(explained_variance_goals, "explained_variance_goals", "explained_variance")
             + _check_goals(learnables_reduction_goals, "learnables_reduction_goals", "learnables_reduction")
             + _check_goals(flops_reduction_goals, "flops_reduction_goals", "flops_reduction"))
    selected = select_layers(model, layer_names, exclude=exclude)
    tied = tied_left_out(model, layer_names, exclude)
    withheld = {**tied_layers(model), **tied}  # a tied head compressed with its table says so
    excluded = excluded_layers(model, layer_names, selected, tied)
    npca, analysed = _statistics(model, npca_or_data, selected, layer_names is None,
                                 verbosity, forward_fn)
    options = measured_options(model, npca, analysed, criterion, progress=verbosity != "off")
    network_learnables = count_learnables(model)
    flops = None if not flops_reduction_goals else flop_budget(
        model, analysed, *_flops_example(npca, npca_or_data, flops_input), forward_fn=forward_fn)
    reduction, explained = tradeoff_curve(options, network_learnables)
    report = AnalysisReport(
        network_learnables,
        {name: _layer_report(name, module, selected, excluded, withheld, options.get(name), npca)
         for name, module in _listed_modules(model)},
        {str(goal): _goal_outcome(model, goal, analysed, options, excluded, tied, npca, flops) for goal in goals},
        reduction, explained, None if eval_fn is None else _sensitivity(model, npca, eval_fn, goals, analysed))
    if verbosity != "off":
        print(report.table())
    return report


def _sensitivity(model, npca, eval_fn, goals, analysed) -> Sensitivity:
    """The sensitivity probe at the report's explained variance goals (the defaults if none)."""
    probed = [goal.value for goal in goals if not goal.is_budget]
    return probe_sensitivity(model, npca, eval_fn, layer_names=list(analysed), verbosity="off",
                             explained_variance_goals=probed or DEFAULT_EXPLAINED_VARIANCE_GOALS)


def _check_goals(goals, argument: str, kind: str) -> list[Goal]:
    """The goals of ``kind`` at a sequence of fractions, or an error naming ``argument``."""
    if isinstance(goals, str) or not hasattr(goals, "__iter__"):
        raise ValueError(f"{argument}: expected a sequence of numbers in [0, 1] (e.g. (0.9, 0.95)), "
                         f"got {goals!r}.")
    return [Goal(kind, check_fraction(goal, argument)) for goal in goals]


def _flops_example(npca, npca_or_data, flops_input):
    """``(batch, argument)`` of the FLOPs goals: ``flops_input``, the first held-out batch, or the
    first batch of the data given."""
    if flops_input is None and not isinstance(npca_or_data, NeuronPCA):
        first = next(iter(as_batches(npca_or_data)), None)  # None: an iterator the calibration used up
        if first is not None:
            return first, "flops_input (the first calibration batch)"
    return flops_example(npca, flops_input)


def _statistics(model, npca_or_data, selected: dict, all_layers: bool, verbosity, forward_fn):
    """The NeuronPCA to use and the layers to analyse with it."""
    if not isinstance(npca_or_data, NeuronPCA):
        npca = NeuronPCA(model, npca_or_data, layer_names=list(selected), verbosity=verbosity,
                         forward_fn=forward_fn, loss_fn=None, validation=None)
        return npca, selected
    npca = npca_or_data
    analysed = ({name: m for name, m in selected.items() if name in npca.layer_names} if all_layers
                else selected)
    if not analysed:
        raise ValueError(f"npca_or_data: the NeuronPCA holds statistics of none of the model's "
                         f"projectable layers ({', '.join(selected)}); it was computed on another "
                         "model. Compute it on this one.")
    check_statistics(npca, analysed)
    return npca, analysed


def _listed_modules(model: nn.Module):
    """``(name, module)`` of every compressed form, projectable layer or module holding
    learnables itself, in model order; the parts of a compressed form or of an attention
    layer (its ``out_proj``) are not listed."""
    for name, module, whole in outermost(model, _whole):
        if whole or why_not_projectable(module) is None or _own_learnables(module):
            yield name, module


def _whole(module: nn.Module) -> bool:
    """Whether ``module`` is listed with its parts' learnables: a compressed form (packed or
    unpacked), or a layer that uses its children's weights itself (an attention's ``out_proj``,
    the ``functional_children`` of its family)."""
    kind = kind_of(module)
    return is_form(module) or (kind is not None and bool(kind.traits.functional_children))


def _own_learnables(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)


def _layer_report(name: str, module: nn.Module, selected: dict, excluded: list, tied: dict,
                  options: LayerOptions | None, npca: NeuronPCA) -> LayerReport:
    learnables = count_learnables(module) if _whole(module) else _own_learnables(module)
    if options is None:
        reason = tied.get(name) or why_not_projectable(module)
        if reason is not None:
            return LayerReport(name, type(module).__name__, learnables, False, reason)
        reason = ("excluded by exclude" if name in excluded
                  else "not selected by layer_names" if name not in selected
                  else "the NeuronPCA holds no statistics of it")
        return LayerReport(name, type(module).__name__, learnables, True, reason)
    sides = {side: SideSpectrum(npca.spectrum(name, side).eigenvalues.cpu().numpy(), 1.0 - residual)
             for side, residual in options.side_residuals.items()}
    return LayerReport(name, type(module).__name__, learnables, True, None,
                       int(options.learnables[0]),
                       int(options.learnables[options.cheapest_within(0.0)]), sides)


def _goal_outcome(model: nn.Module, goal: Goal, layers: dict, options: dict,
                  excluded: list, tied: dict, npca, flops=None) -> ProjectionInfo:
    """The :class:`ProjectionInfo` that compressing with this goal would return (a dry run of
    :func:`~rankwise.projection.build_projected`: no network is built; a recurrent layer's
    projected form is, to measure its output sequence, :class:`~rankwise.ranks.SequenceBound`)."""
    choices, goal_reached = choose_ranks(options, goal, count_learnables(model), cost=flops)
    bound = SequenceBound(layers, options, npca, goal)
    flops = flops if goal.kind == "flops_reduction" else None
    decisions = Decisions(goal, bound(choices), goal_reached, excluded=excluded, flops=flops,
                          warnings=tie_warnings(tied) + unreached_goal(goal, goal_reached, options,
                                                                       count_learnables(model), flops)
                          + bound.warnings)
    return build_projected(model, layers, options, decisions, build=False)[1]
