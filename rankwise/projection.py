"""compress_network_using_projection and unpack_projected_layers.

Model and data -> :class:`~rankwise.pca.NeuronPCA` (statistics) -> :mod:`rankwise.ranks`
(decisions) -> :mod:`rankwise.layers` (new layers) -> the compressed model and a
:class:`ProjectionInfo`. The input model is never modified unless ``inplace=True``; on any
error it is left as it was.
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from rankwise import latency
from rankwise.forms import unpack_forms
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
    ``explained_variance`` is the estimated fraction of the layer's output variance kept.
    ``dense_seconds`` / ``projected_seconds`` are the median latencies of the layer and of its
    projected form measured on ``latency_input`` (``None`` when not measured); for a layer kept
    dense because its projected form was not faster, those of the form that was rejected. For an
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
    dense_seconds: float | None = None
    projected_seconds: float | None = None


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
    kept_dense_for_latency : list of str
        Layers kept dense because their projected form was not faster on ``latency_input``
        (empty when no ``latency_input`` was given).
    latency_device : str or None
        The device latencies were measured on (``None`` when no ``latency_input`` was given).
    """

    goal: str
    goal_reached: bool
    learnables_before: int
    learnables_after: int
    layers: dict
    kept_dense_for_latency: list = field(default_factory=list)
    latency_device: str | None = None

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
        """A before/after table of layers, ranks, learnables and explained variance.

        When latencies were measured (``latency_input``), a column gives each measured layer's
        dense and projected latencies and a last line the layers kept dense for speed.
        """
        header = ("layer", "type", "side", "rank in", "rank out", "learnables", "explained var.")
        rows = [(p.name, p.kind, p.side, format_ranks(p.rank_in), format_ranks(p.rank_out),
                 f"{p.learnables_before:,} -> {p.learnables_after:,}", f"{p.explained_variance:.4f}")
                for p in self.layers.values()]
        footer = (f"network: {self.learnables_before:,} -> {self.learnables_after:,} learnables "
                  f"({100 * self.learnables_reduction:.1f}% removed), explained variance "
                  f"{self.explained_variance:.4f}, {self.goal}"
                  + ("" if self.goal_reached else " (not reachable: the maximum was removed)"))
        if self.latency_device is not None:
            header += ("latency dense -> projected",)
            rows = [row + (_format_latency(p, p.name in self.kept_dense_for_latency),)
                    for row, p in zip(rows, self.layers.values())]
            footer += "\n" + (f"kept dense: not faster on {self.latency_device}: "
                              + ", ".join(self.kept_dense_for_latency) if self.kept_dense_for_latency
                              else f"latency on {self.latency_device}: every projected layer is faster")
        return format_table(header, rows, footer=footer)

    def __str__(self) -> str:
        return self.table()


def compress_network_using_projection(model: nn.Module, npca_or_data, *,
                                      explained_variance_goal: float | None = None,
                                      learnables_reduction_goal: float | None = None,
                                      layer_names=None, unpack: bool = False,
                                      verbosity: str = "summary", inplace: bool = False,
                                      forward_fn=None, latency_input=None):
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

    **Latency-aware projection.** Fewer learnables do not always make a layer faster (a
    factored layer runs two or three smaller kernels instead of one). With ``latency_input``,
    once the ranks are chosen, every layer to be projected is timed in isolation, dense and
    projected (:func:`rankwise.median_latency`: the median of 20 calls after 3 warm-up calls,
    in eval mode, on the inputs the layer received when the model ran on ``latency_input``,
    so at the deployment batch size and device). A layer whose projected form is not faster
    (projected seconds >= dense seconds) is kept dense and leaves the analysed set; ranks are
    then chosen again over the remaining layers (a ``learnables_reduction_goal`` is met by
    the layers that do get faster where possible; ``goal_reached`` is False otherwise), and
    the newly chosen forms are timed, until no layer is excluded (at most one round per
    layer). Cost: two timings per projected layer per round, a layer at an unchanged choice
    not being timed again. Measurements on a shared or busy machine are noisy (hence
    medians); a layer whose two forms take about the same time may fall either way. Time with
    the torch thread count you deploy with (``torch.set_num_threads``): where other processes
    keep the cores busy, torch's intra-op threads wait for each other and a layer's latency
    becomes that of the scheduler, not of its arithmetic. A
    :class:`~rankwise.layers.ProjectedLSTM` / ``ProjectedGRU`` is timed as built (its
    ``execution="auto"`` path at that batch and device).

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
    latency_input : torch.Tensor, tuple, list or dict, optional
        An example batch at the batch size and on the device the compressed model will be
        deployed to (e.g. 32 MNIST images), on the model's device: keep only the projected
        layers that are faster on it (see above). The model is called as
        ``model(latency_input)`` (a tuple or list: positional arguments; a dict: keyword
        arguments). ``None`` (the default): no timing, layers chosen by the goal alone.

    Returns
    -------
    model : torch.nn.Module
        The compressed model.
    info : ProjectionInfo

    Raises
    ------
    ValueError
        On bad arguments, among them a ``latency_input`` on another device than the model,
        one the model's forward fails on, or one whose forward does not call every analysed
        layer. The model is left as it was.
    """
    check_verbosity(verbosity)
    goal_name, goal = check_goals(explained_variance_goal, learnables_reduction_goal)
    layers = select_layers(model, layer_names)
    calls = None if latency_input is None else record_layer_calls(model, layers, latency_input)
    npca = npca_or_data if isinstance(npca_or_data, NeuronPCA) else NeuronPCA(
        model, npca_or_data, layer_names=list(layers), verbosity=verbosity, forward_fn=forward_fn)
    check_statistics(npca, layers)
    options = {name: layer_options(npca, name) for name in layers}
    learnables_before = count_learnables(model)
    timings, kept_dense = {}, []
    if calls is None:
        choices, goal_reached = choose_ranks(options, goal_name, goal, learnables_before, verbosity)
    else:
        choices, goal_reached, timings, kept_dense = choose_faster_ranks(
            layers, options, calls, goal_name, goal, learnables_before, unpack, verbosity)
    replacements = {name: _project(layers[name], options[name], choice, unpack)
                    for name, choice in choices.items() if choice.side != "dense"}
    compressed = model if inplace else copy.deepcopy(model)
    for name, replacement in replacements.items():
        compressed.set_submodule(name, replacement)
    info = ProjectionInfo(f"{goal_name}={goal:g}", goal_reached, learnables_before,
                          count_learnables(compressed),
                          {name: describe_choice(name, layers[name], choices[name], timings.get(name))
                           for name in layers},
                          kept_dense, None if calls is None else str(latency.device_of(model, latency_input)))
    _report(info, verbosity)
    return compressed, info


def unpack_projected_layers(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every :class:`ProjectedLayer` (every compressed form) by the equivalent plain torch layers.

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
    return unpack_forms(model, inplace)  # every compressed form, TruncatedConv too


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


# Latency ------------------------------------------------------------------------------------

def record_layer_calls(model: nn.Module, layers: dict, latency_input) -> dict[str, tuple[tuple, dict]]:
    """The arguments each layer receives when ``model`` runs on ``latency_input``.

    The model runs once in eval mode under ``torch.no_grad()`` with forward hooks on
    ``layers``; each layer's positional and keyword arguments at its first call are kept
    (tensors detached and copied; an LSTM's ``hx`` or a ``PackedSequence`` as they come).

    Parameters
    ----------
    model : torch.nn.Module
    layers : dict of str to torch.nn.Module
        The analysed layers by qualified name.
    latency_input : torch.Tensor, tuple, list or dict
        See :func:`compress_network_using_projection`.

    Returns
    -------
    dict of str to (tuple, dict)
        ``(args, kwargs)`` per layer, to time it with ``layer(*args, **kwargs)``.

    Raises
    ------
    ValueError
        When ``latency_input`` is not a batch, lies on another device than the model, makes
        the forward fail, or does not make it call every layer. The model is left as it was.
    """
    try:
        args, kwargs = latency.as_call(latency_input)
    except TypeError:
        raise ValueError(f"latency_input: expected a tensor, a tuple or list of positional arguments "
                         f"or a dict of keyword arguments, got {type(latency_input).__name__}.") from None
    model_device, input_device = latency.module_device(model), latency.input_device(latency_input)
    if model_device is not None and input_device is not None and input_device != model_device:
        raise ValueError(f"latency_input: it is on {input_device} but the model is on {model_device}; "
                         f"latencies are measured on the model's device: pass a batch on {model_device} "
                         f"(e.g. latency_input.to({str(model_device)!r})), with the model on the device "
                         "you deploy to.")
    calls: dict[str, tuple[tuple, dict]] = {}

    def recorder(name):
        def hook(module, args, kwargs, output):
            calls.setdefault(name, (_detached(args), _detached(kwargs)))
        return hook

    handles = [layer.register_forward_hook(recorder(name), with_kwargs=True) for name, layer in layers.items()]
    try:
        with latency.eval_mode(model), torch.no_grad():
            model(*args, **kwargs)
    except Exception as error:
        raise ValueError(f"latency_input: the model's forward failed on it ({type(error).__name__}: "
                         f"{error}); pass a batch the model accepts.") from error
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in calls]
    if missing:
        raise ValueError(f"latency_input: the model's forward on it does not call layer(s) "
                         f"{', '.join(map(repr, missing))}, so their latency cannot be measured; pass a "
                         "batch that runs every analysed layer, or leave these layers out with layer_names.")
    return calls


def choose_faster_ranks(layers: dict, options: dict[str, LayerOptions], calls: dict, goal_name: str,
                        goal: float, network_learnables: int, unpack: bool, verbosity: str = "off"):
    """:func:`choose_ranks`, keeping dense the layers whose projected form is not faster.

    Each round chooses ranks over the layers not yet excluded, times every layer to be
    projected (dense and projected, on its recorded arguments, unless it was timed at the same
    choice before) and excludes those whose projected form takes at least as long; rounds stop
    when none is excluded.

    Parameters
    ----------
    layers : dict of str to torch.nn.Module
        The analysed dense layers.
    options : dict of str to LayerOptions
    calls : dict of str to (tuple, dict)
        Each layer's recorded arguments (:func:`record_layer_calls`).
    goal_name, goal, network_learnables, verbosity
        As for :func:`choose_ranks`.
    unpack : bool
        Time the projected forms as plain torch layers (as they will be built).

    Returns
    -------
    choices : dict of str to RankChoice
        Every layer's choice, in model order (dense for the excluded layers).
    goal_reached : bool
    timings : dict of str to (float, float)
        ``(dense_seconds, projected_seconds)`` of each projected layer at its final choice and
        of each excluded layer at the choice that was rejected.
    kept_dense : list of str
        The excluded layers, in model order.
    """
    measured: dict[tuple, tuple[float, float]] = {}
    rejected: dict[str, tuple[float, float]] = {}
    for _ in range(len(options) + 1):  # every round but the last excludes a layer
        active = {name: opts for name, opts in options.items() if name not in rejected}
        choices, goal_reached = choose_ranks(active, goal_name, goal, network_learnables, verbosity)
        slower = {}
        for name, choice in choices.items():
            if choice.side == "dense":
                continue
            key = (name, choice.side, choice.rank_in, choice.rank_out)
            if key not in measured:
                projected = _project(layers[name], options[name], choice, unpack)
                measured[key] = _time_layer(layers[name], calls[name]), _time_layer(projected, calls[name])
                if verbosity in ("steps", "iterations"):
                    dense_s, projected_s = measured[key]
                    print(f"latency {name}: dense {latency.format_seconds(dense_s)}, {choice.side} "
                          f"(rank in {format_ranks(choice.rank_in)}, rank out {format_ranks(choice.rank_out)}) "
                          f"{latency.format_seconds(projected_s)}"
                          + (" -> kept dense" if projected_s >= dense_s else ""))
            if measured[key][1] >= measured[key][0]:
                slower[name] = measured[key]
        if not slower:
            break
        rejected.update(slower)
    timings = {name: measured[(name, c.side, c.rank_in, c.rank_out)]
               for name, c in choices.items() if c.side != "dense"}
    timings.update(rejected)
    choices = {name: choices[name] if name in choices else _dense_choice(options[name]) for name in options}
    return choices, goal_reached, timings, [name for name in options if name in rejected]


def _time_layer(layer: nn.Module, call: tuple[tuple, dict]) -> float:
    args, kwargs = call
    return latency.median_latency(_WithKeywords(layer, kwargs) if kwargs else layer, args)


class _WithKeywords(nn.Module):
    """``layer(*args, **kwargs)`` with fixed ``kwargs``, to time a call that has some."""

    def __init__(self, layer: nn.Module, kwargs: dict):
        super().__init__()
        self.layer, self.kwargs = layer, kwargs

    def forward(self, *args):
        return self.layer(*args, **self.kwargs)


def _dense_choice(options: LayerOptions) -> RankChoice:
    return options.choice(len(options.learnables) - 1)


def _detached(value):
    """``value`` with every tensor in it detached and copied (tuples, lists, dicts, ``PackedSequence``)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, PackedSequence):
        return PackedSequence(*(None if v is None else v.detach().clone() for v in value))
    if isinstance(value, tuple | list):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _format_latency(p: LayerProjection, kept_dense: bool) -> str:
    if p.dense_seconds is None:
        return "-"
    return (f"{latency.format_seconds(p.dense_seconds)} -> {latency.format_seconds(p.projected_seconds)}"
            + (" (slower: kept dense)" if kept_dense else ""))


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


def describe_choice(name: str, layer: nn.Module, choice: RankChoice,
                    timing: tuple[float, float] | None = None) -> LayerProjection:
    """What choosing ``choice`` for the dense ``layer`` called ``name`` does to it, with its
    measured ``(dense_seconds, projected_seconds)`` if any."""
    return LayerProjection(name, layer_kind(layer), choice.side, choice.rank_in, choice.rank_out,
                           count_learnables(layer),
                           count_learnables(layer) if choice.side == "dense" else choice.learnables,
                           choice.explained_variance, *(timing or (None, None)))


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
