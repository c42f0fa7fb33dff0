"""compress_network_using_projection and unpack_projected_layers.

Model and data -> :class:`~rankwise.pca.NeuronPCA` (statistics) -> :mod:`rankwise.ranks`
(decisions) -> :mod:`rankwise.layers` (new layers) -> the compressed model and a
:class:`ProjectionInfo`. The input model is never modified unless ``inplace=True``; on any
error it is left as it was.
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass

from torch import nn

from rankwise.layers import ProjectedConv, ProjectedGRU, ProjectedLayer, ProjectedLinear, ProjectedLSTM
from rankwise.learnables import count_learnables
from rankwise.pca import NeuronPCA, check_verbosity, statistics_shape
from rankwise.ranks import (LayerOptions, RankChoice, RecurrentOptions, allocate_learnables_reduction,
                            choose_by_explained_variance, layer_options)
from rankwise.tables import format_ranks, format_table
from rankwise.targets import layer_kind, select_layers

DEFAULT_EXPLAINED_VARIANCE = 0.95


@dataclass(frozen=True)
class LayerProjection:
    """What happened to one analysed layer.

    ``side`` is ``"dense"`` for a layer left as it was; ``rank_in`` / ``rank_out`` are the
    widths of its input / output projections (``None`` where that side is not projected);
    ``explained_variance`` is the estimated fraction of the layer's output variance kept. For an
    LSTM or GRU layer the sides are its input and its hidden state, the output variance that of
    its gate pre-activations, and the ranks, for a layer of several cells (stacked layers,
    directions), tuples over the cells ``l0, l0_reverse, l1, ...`` (see :mod:`rankwise.ranks`).
    """

    name: str
    kind: str
    side: str
    rank_in: int | tuple | None
    rank_out: int | tuple | None
    learnables_before: int
    learnables_after: int
    explained_variance: float


@dataclass(frozen=True)
class ProjectionInfo:
    """Outcome of :func:`compress_network_using_projection`.

    Attributes
    ----------
    goal : str
        The goal as given, e.g. ``"learnables_reduction_goal=0.9"``.
    goal_reached : bool
        False when a learnables reduction goal was above the maximum possible (the maximum
        was removed).
    learnables_before, learnables_after : int
        Learnables of the whole network.
    layers : dict of str to LayerProjection
        Every analysed layer, projected or kept dense, in model order.
    """

    goal: str
    goal_reached: bool
    learnables_before: int
    learnables_after: int
    layers: dict

    @property
    def learnables_reduction(self) -> float:
        """Fraction of the whole network's learnables removed."""
        return 1.0 - self.learnables_after / self.learnables_before

    @property
    def explained_variance(self) -> float:
        """Mean explained variance of the analysed layers, weighted by their original learnables."""
        weights = [p.learnables_before for p in self.layers.values()]
        kept = [p.learnables_before * p.explained_variance for p in self.layers.values()]
        return sum(kept) / sum(weights)

    @property
    def layer_names(self) -> list[str]:
        """The layers that were projected (not kept dense)."""
        return [name for name, p in self.layers.items() if p.side != "dense"]

    def table(self) -> str:
        """A before/after table of layers, ranks, learnables and explained variance."""
        header = ("layer", "type", "side", "rank in", "rank out", "learnables", "explained var.")
        rows = [(p.name, p.kind, p.side, format_ranks(p.rank_in), format_ranks(p.rank_out),
                 f"{p.learnables_before:,} -> {p.learnables_after:,}", f"{p.explained_variance:.4f}")
                for p in self.layers.values()]
        return format_table(header, rows, footer=(
            f"network: {self.learnables_before:,} -> {self.learnables_after:,} learnables "
            f"({100 * self.learnables_reduction:.1f}% removed), explained variance "
            f"{self.explained_variance:.4f}, {self.goal}"
            + ("" if self.goal_reached else " (not reachable: the maximum was removed)")))

    def __str__(self) -> str:
        return self.table()


def compress_network_using_projection(model: nn.Module, npca_or_data, *,
                                      explained_variance_goal: float | None = None,
                                      learnables_reduction_goal: float | None = None,
                                      layer_names=None, unpack: bool = False,
                                      verbosity: str = "summary", inplace: bool = False,
                                      forward_fn=None):
    """Replace layers by projected layers acting in their high-variance subspaces.

    PyTorch counterpart of MATLAB's ``compressNetworkUsingProjection``. For each analysed
    layer ``y = W x + b`` the options are output projection ``y ~ mu_y + P P^T (W x + b - mu_y)``,
    input projection ``y ~ W Q Q^T x + b + W (I - Q Q^T) mu_x`` and both, with ``P`` and ``Q``
    the leading principal directions of the layer's output and input; the side and ranks of
    each layer are chosen by :mod:`rankwise.ranks` to keep the most output variance per
    learnable. A layer whose factored form would not be smaller stays dense. An ``nn.LSTM`` /
    ``nn.GRU`` becomes a :class:`~rankwise.layers.ProjectedLSTM` /
    :class:`~rankwise.layers.ProjectedGRU`, projected on the input and the hidden state of
    each stacked layer and direction (:mod:`rankwise.layers.recurrent`).

    Parameters
    ----------
    model : torch.nn.Module
        The trained network.
    npca_or_data : NeuronPCA or iterable
        Statistics computed by :class:`NeuronPCA`, or calibration batches to compute them.
    explained_variance_goal : float in [0, 1], optional
        Each layer gets the cheapest form keeping at least this fraction of its output
        variance. The default (0.95) when neither goal is given.
    learnables_reduction_goal : float in [0, 1], optional
        Fraction of the whole network's learnables to remove, with ranks allocated across
        layers globally. At least the goal is removed; the maximum when the goal is above it;
        more where it costs no variance. Exclusive with ``explained_variance_goal``.
    layer_names : str or list of str, optional
        Project only these layers (qualified module names).
    unpack : bool
        Return plain torch layers (``nn.Sequential``) instead of :class:`ProjectedLayer`;
        projected LSTM and GRU layers stay wrappers (no plain torch layer is equivalent).
    verbosity : {"off", "summary", "steps", "iterations"}
        ``"summary"`` prints a before/after table, ``"steps"`` also one line per layer,
        ``"iterations"`` also every step of the global allocation.
    inplace : bool
        Modify ``model`` itself instead of a copy.
    forward_fn : callable, optional
        ``forward_fn(model, batch)``, used when data is given (see :class:`NeuronPCA`).

    Returns
    -------
    model : torch.nn.Module
        The compressed model.
    info : ProjectionInfo
    """
    check_verbosity(verbosity)
    goal_name, goal = check_goals(explained_variance_goal, learnables_reduction_goal)
    layers = select_layers(model, layer_names)
    npca = npca_or_data if isinstance(npca_or_data, NeuronPCA) else NeuronPCA(
        model, npca_or_data, layer_names=list(layers), verbosity=verbosity, forward_fn=forward_fn)
    check_statistics(npca, layers)
    options = {name: layer_options(npca, name) for name in layers}
    learnables_before = count_learnables(model)
    choices, goal_reached = choose_ranks(options, goal_name, goal, learnables_before, verbosity)
    replacements = {name: _project(layers[name], options[name], choice, unpack)
                    for name, choice in choices.items() if choice.side != "dense"}
    compressed = model if inplace else copy.deepcopy(model)
    for name, replacement in replacements.items():
        compressed.set_submodule(name, replacement)
    info = ProjectionInfo(f"{goal_name}={goal:g}", goal_reached, learnables_before,
                          count_learnables(compressed),
                          {name: describe_choice(name, layers[name], choices[name]) for name in layers})
    _report(info, verbosity)
    return compressed, info


def unpack_projected_layers(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every :class:`ProjectedLayer` by the equivalent plain torch layers.

    Counterpart of MATLAB's ``unpackProjectedLayers``: each wrapper becomes an
    ``nn.Sequential`` of ``nn.Linear`` / ``nn.ConvNd`` layers computing the same outputs.
    :class:`~rankwise.layers.ProjectedLSTM` and :class:`~rankwise.layers.ProjectedGRU` stay
    as they are (as MATLAB's ``lstmProjectedLayer`` does): no plain torch layer runs a
    recurrence through projected states (their ``to_dense()`` gives an equivalent
    ``nn.LSTM`` / ``nn.GRU`` with the original's learnables).

    Parameters
    ----------
    model : torch.nn.Module
    inplace : bool
        Modify ``model`` itself instead of a copy.

    Returns
    -------
    torch.nn.Module
    """
    if isinstance(model, ProjectedLayer):
        return (model if inplace else copy.deepcopy(model)).unpack()
    unpacked = model if inplace else copy.deepcopy(model)
    names = [name for name, m in unpacked.named_modules() if isinstance(m, ProjectedLayer)]
    for name in names:
        if any(name.startswith(outer + ".") for outer in names):
            continue
        unpacked.set_submodule(name, unpacked.get_submodule(name).unpack())
    return unpacked


def choose_ranks(options: dict[str, LayerOptions], goal_name: str, goal: float,
                 network_learnables: int, verbosity: str = "off") -> tuple[dict[str, RankChoice], bool]:
    """Each layer's option for one goal, and whether the goal was reached.

    Parameters
    ----------
    options : dict of str to LayerOptions
        The analysed layers' frontiers.
    goal_name : {"explained_variance_goal", "learnables_reduction_goal"}
    goal : float in [0, 1]
    network_learnables : int
        Learnables of the whole network (the reduction goal's denominator).
    verbosity : str
        ``"iterations"`` prints every step of the global allocation.

    Returns
    -------
    choices : dict of str to RankChoice
    goal_reached : bool
    """
    if goal_name == "explained_variance_goal":
        chosen, goal_reached = choose_by_explained_variance(options, goal), True
    else:
        allocation = allocate_learnables_reduction(options, goal, network_learnables)
        chosen, goal_reached = allocation.chosen, allocation.goal_reached
        if verbosity == "iterations":
            _print_allocation(allocation, options, network_learnables)
    return {name: options[name].choice(index) for name, index in chosen.items()}, goal_reached


def check_goals(explained_variance_goal, learnables_reduction_goal) -> tuple[str, float]:
    if explained_variance_goal is not None and learnables_reduction_goal is not None:
        raise ValueError("explained_variance_goal and learnables_reduction_goal are exclusive: "
                         "give one of them.")
    if learnables_reduction_goal is not None:
        return "learnables_reduction_goal", check_fraction(learnables_reduction_goal,
                                                           "learnables_reduction_goal")
    if explained_variance_goal is None:
        return "explained_variance_goal", DEFAULT_EXPLAINED_VARIANCE
    return "explained_variance_goal", check_fraction(explained_variance_goal, "explained_variance_goal")


def check_fraction(value, argument: str) -> float:
    """``value`` as a float, or a ValueError naming ``argument`` unless it is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{argument}: expected a number in [0, 1], got {value!r}.")
    return float(value)


def check_statistics(npca: NeuronPCA, layers: dict) -> None:
    """Raise a clear error unless ``npca`` holds statistics of these layers, with their shapes.

    Parameters
    ----------
    npca : NeuronPCA
    layers : dict of str to torch.nn.Module
        The model's layers by qualified name.
    """
    for name, layer in layers.items():
        if name not in npca.layer_names:
            raise ValueError(f"npca_or_data: the NeuronPCA has no statistics for layer {name!r} "
                             f"(it analysed: {', '.join(npca.layer_names)}). Compute it with that "
                             "layer included, or pass layer_names to restrict the projection.")
        expected, found = statistics_shape(layer), npca.statistics(name).shape
        if found != expected:
            raise ValueError(f"npca_or_data: layer {name!r} has shape {expected} in the model but "
                             f"{found} in the NeuronPCA; it was computed on another model.")


def _project(layer: nn.Module, options: LayerOptions, choice: RankChoice, unpack: bool) -> nn.Module:
    build = _project_recurrent if isinstance(options, RecurrentOptions) else _project_dense
    projected = build(layer, options, choice)
    return projected.unpack() if unpack else projected


def _project_dense(layer: nn.Module, options: LayerOptions, choice: RankChoice) -> ProjectedLayer:
    cls = ProjectedLinear if isinstance(layer, nn.Linear) else ProjectedConv
    return cls.from_dense(
        layer,
        input_basis=None if choice.rank_in is None else options.input_basis[:, :choice.rank_in],
        input_mean=options.input_mean,
        output_basis=None if choice.rank_out is None else options.output_basis[:, :choice.rank_out],
        output_mean=options.output_mean)


def _project_recurrent(layer: nn.Module, options: RecurrentOptions, choice: RankChoice) -> ProjectedLayer:
    cls = ProjectedLSTM if isinstance(layer, nn.LSTM) else ProjectedGRU

    def bases(ranks, per_cell: dict) -> dict:
        ranks = ranks if isinstance(ranks, tuple) else (ranks,)
        return {cell: per_cell[cell][:, :rank]
                for cell, rank in zip(options.cells, ranks) if rank is not None}

    return cls.from_dense(layer, input_basis=bases(choice.rank_in, options.input_basis),
                          input_mean=options.input_mean,
                          output_basis=bases(choice.rank_out, options.output_basis),
                          output_mean=options.output_mean)


def describe_choice(name: str, layer: nn.Module, choice: RankChoice) -> LayerProjection:
    """What choosing ``choice`` for the dense ``layer`` called ``name`` does to it."""
    return LayerProjection(name, layer_kind(layer), choice.side, choice.rank_in, choice.rank_out,
                           count_learnables(layer),
                           count_learnables(layer) if choice.side == "dense" else choice.learnables,
                           choice.explained_variance)


def _report(info: ProjectionInfo, verbosity: str) -> None:
    if verbosity in ("steps", "iterations"):
        for p in info.layers.values():
            print(f"{p.name}: {p.side} (rank in {format_ranks(p.rank_in)}, rank out {format_ranks(p.rank_out)}), "
                  f"{p.learnables_before:,} -> {p.learnables_after:,} learnables, "
                  f"explained variance {p.explained_variance:.4f}")
    if verbosity != "off":
        print(info.table())


def _print_allocation(allocation, options: dict, network_learnables: int) -> None:
    for step, (name, removed, index) in enumerate(allocation.steps, start=1):
        choice = options[name].choice(index)
        print(f"allocation step {step}: {name} -> {choice.side} (rank in {format_ranks(choice.rank_in)}, "
              f"rank out {format_ranks(choice.rank_out)}), {removed / network_learnables:.2%} removed")
