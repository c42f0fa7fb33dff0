"""compress_network_using_projection, unpack_projected_layers, and the one builder.

Model and data -> :class:`~rankwise.pca.NeuronPCA` (statistics) -> :mod:`rankwise.ranks`
(decisions) -> :func:`build_projected` (new layers, :mod:`rankwise.layers.build`) -> the
compressed model and a :class:`ProjectionInfo`. Every caller that turns decisions into modules
or into an info (compress, :mod:`rankwise.incremental`, :mod:`rankwise.sensitivity`, the
report's dry run) goes through :func:`build_projected`. The input model is never modified
unless ``inplace=True``; on any error it is left as it was.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

from torch import nn

from rankwise import latency
from rankwise.checks import check_verbosity
from rankwise.divergence import check_score_fn
from rankwise.goals import Goal, check_allocation, check_goals
from rankwise.forms import fused_paths_off, unpack_forms
from rankwise.info import LayerProjection, ProjectionInfo, describe_choice
from rankwise.kinds import kind_of
from rankwise.latency_aware import choose_faster_ranks, record_layer_calls
from rankwise.latency_budget import check_latency_goal, latency_budget, meet_latency_goal
from rankwise.layers.build import projected_modules
from rankwise.learnables import count_learnables
from rankwise.pca import NeuronPCA
from rankwise.correction import build_sequentially, correction_batches
from rankwise.flops import check_round_to, flop_budget, flops_example
from rankwise.ranks import SequenceBound, choose_ranks, criterion_named, measured_options, unreached_goal
from rankwise.selection import MeasuredChoice, how_to_decide
from rankwise.tables import format_ranks
from rankwise.targets import excluded_layers, select_layers, tie_warnings, tied_left_out
from rankwise.ties import check_tie_correction

__all__ = ["Decisions", "LayerProjection", "ProjectionInfo", "build_projected", "check_statistics",
           "compress_network_using_projection", "unpack_projected_layers"]


@dataclass(frozen=True)
class Decisions:
    """Explicit decisions for :func:`build_projected`: a choice per layer and how they came.

    ``choices`` maps every layer to its :class:`~rankwise.ranks.RankChoice` (``"dense"`` for a
    layer kept as it is), in model order; ``timings`` the measured ``(dense_seconds,
    projected_seconds)`` of the layers timed; ``flops`` the FlopBudget of a FLOPs goal; ``speed``
    the measured comparison of a latency goal. The other fields are copied into the
    :class:`ProjectionInfo` (see there).
    """

    goal: Goal
    choices: dict
    goal_reached: bool = True
    timings: dict = field(default_factory=dict)
    kept_dense_for_latency: list = field(default_factory=list)
    latency_device: str | None = None
    excluded: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    measured: MeasuredChoice | None = None
    flops: object = None  # a FlopBudget (rankwise.ranks.costs)
    speed: object = None  # a SpeedComparison (rankwise.latency), under a latency goal


def compress_network_using_projection(model: nn.Module, npca_or_data, *,
                                      explained_variance_goal: float | None = None,
                                      learnables_reduction_goal: float | None = None,
                                      flops_reduction_goal: float | None = None, flops_input=None,
                                      round_to: int | None = None, latency_reduction_goal: float | None = None,
                                      layer_names=None, unpack: bool = False,
                                      verbosity: str = "summary", inplace: bool = False,
                                      forward_fn=None, latency_input=None, exclude=None,
                                      criterion: str = "auto", loss_fn=None, allocation: str = "auto",
                                      correction: str | None = None, correction_data=None,
                                      validation="auto", score_fn="auto"):
    """Replace layers by projected layers acting in their high-variance subspaces.

    PyTorch counterpart of MATLAB's ``compressNetworkUsingProjection``. For each analysed
    layer ``y = W x + b`` the options are output projection ``y ~ mu_y + P P^T (W x + b - mu_y)``,
    input projection ``y ~ W Q Q^T x + b + W (I - Q Q^T) mu_x`` and both, with ``P`` and ``Q``
    the leading principal directions of the layer's output and input; the side and ranks of
    each layer are chosen by :mod:`rankwise.ranks` (decisions) to keep the most output variance per
    learnable. A layer whose factored form would not be smaller stays dense. An ``nn.LSTM`` /
    ``nn.GRU`` becomes a :class:`~rankwise.layers.ProjectedLSTM` /
    :class:`~rankwise.layers.ProjectedGRU`, projected on the input and the hidden state of
    each stacked layer and direction (:mod:`rankwise.layers.recurrent`). Its per-step gate
    variance does not bound the error that accumulates through the recurrence, so its choice is
    checked on the calibration sequences the NeuronPCA keeps (:mod:`rankwise.ranks.sequence`):
    under ``explained_variance_goal=g`` it moves toward more learnables until the measured
    explained variance of its output sequence reaches ``g``; under a learnables reduction goal
    the measurement is reported (:attr:`LayerProjection.measured_explained_variance`).

    **Where errors are measured** (``criterion``, :mod:`rankwise.ranks.criterion`). With
    ``"variance"`` each option is judged by the fraction of the layer's output variance it loses,
    measured after the eval-mode BatchNorm that follows the layer, if one does (the BatchNorm's
    ``gamma / sigma`` weights the output channels: the low-variance channels it amplifies are
    not dropped as negligible). With ``"loss"`` each option is judged by its estimated increase
    of the network's loss, ``1/2 E[d^T G d]`` with ``G`` the Fisher information of the layer's
    output (``NeuronPCA(..., loss_fn=...)``), in one unit across layers, and the projection is
    the one minimising that error (the truncated SVD of ``G^(1/2) W C_x^(1/2)``).

    **Sequential correction** (``correction="sequential"``). Layers are built in the order the
    forward calls them, each first refitted by least squares to the original layer's output
    given the inputs the compressed network now feeds it, then projected at its chosen ranks
    (:mod:`rankwise.correction`), so that errors do not compound over depth. It needs the
    calibration data (``npca_or_data`` given as data, or ``correction_data``) and costs, per
    projected layer, a pass of both networks up to that layer and one calibration pass.

    **Latency-aware projection.** Fewer learnables do not always make a layer faster (a
    factored layer runs two or three smaller kernels instead of one). With ``latency_input``,
    every layer to be projected is timed in isolation, dense and projected
    (:func:`rankwise.median_latency`, on the inputs it received when the model ran on
    ``latency_input``: the deployment batch size and device); a layer whose projected form is
    not faster is kept dense and the ranks are chosen again over the others, until none is
    excluded (:mod:`rankwise.latency_aware`; when the layers that do get faster cannot meet the
    goal they keep their first choices and ``goal_reached`` is False). Timings are noisy; time
    with the torch thread count you deploy with. Recurrent layers are timed as built.

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
        more where it costs no variance. Exclusive with the other goals.
    flops_reduction_goal : float in [0, 1], optional
        Fraction of the network's FLOPs on ``flops_input`` (:func:`rankwise.count_flops`) to
        remove, ranks allocated by estimated error per FLOP saved (:mod:`rankwise.ranks.costs`;
        ``Linear``, convolution, GPT-2 ``Conv1D`` layers; others stay dense). At least the goal
        is removed, the maximum above it (``info.flops_reduction``). Exclusive with the others.
    flops_input : torch.Tensor, tuple, list or dict, optional
        Its example batch, run as a calibration batch is. Default: the first held-out batch.
    round_to : int, optional
        With ``flops_reduction_goal``: every projected rank a multiple of it (CPU convolution
        kernels pad channels to blocks of 8 or 16; BENCHMARKS.md, "FLOPs goals and speed").
    latency_reduction_goal : float in [0, 1], optional
        Fraction of the network's latency on ``latency_input`` (required) to remove, ranks
        allocated by estimated error per measured second saved; each decision is built and
        timed against the original with :func:`rankwise.compare_speed`, the target raised by
        any shortfall (:mod:`rankwise.latency_budget`; ``info.latency_reduction``). Exclusive
        with the other goals.
    layer_names : str or list of str, optional
        Project only these layers (qualified module names).
    exclude : str or list of str, optional
        Leave these layers dense (qualified module names); :attr:`ProjectionInfo.excluded`
        lists them.
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
    allocation : {"auto", "global", "uniform"}
        How a ``learnables_reduction_goal`` is spread: ``"global"`` (the least total estimated
        error, :mod:`rankwise.ranks.allocation`) or ``"uniform"`` (every layer keeps the same
        fraction of its learnables, each at its least lossy option within it). ``"auto"`` (the
        default): measured (see ``criterion``).
    criterion : {"auto", "variance", "loss"} or another entry of :data:`rankwise.ranks.CRITERIA`
        How each option's error is estimated (see above). ``"loss"`` needs a NeuronPCA computed
        with ``loss_fn`` (or ``loss_fn`` here, when data is given). ``"auto"`` (the default):
        under a ``learnables_reduction_goal``, the criterion, allocation and shrinkage are
        chosen by measuring candidate compressions, decided on the statistics of the fitted
        calibration batches, on the held-out ones (:mod:`rankwise.selection`,
        docs/decisions.md; ``info.candidates``, ``info.choice``); under an explained variance
        goal, ``"variance"``.
    loss_fn : {"auto", "kl", "mse"} or callable, optional
        With data: the loss whose gradients the NeuronPCA gathers (see :class:`NeuronPCA`);
        ``"auto"`` when ``None`` and the criterion may read gradients.
    validation : "auto", float, iterable or None
        With data: the calibration batches held out to measure the candidates on
        (:class:`NeuronPCA`'s ``validation``); a NeuronPCA keeps its own.
    score_fn : "auto", "kl", "relative_error" or callable
        How a candidate's outputs on the held-out batches are compared with the original's
        (:mod:`rankwise.divergence`; a callable ``(compressed_outputs, original_outputs, batch)
        -> float``, lower is better).
    correction : {None, "sequential"}
        ``"sequential"``: refit each layer to the original's output given the compressed
        network's input before projecting it (see above).
    correction_data : iterable, optional
        The calibration batches of the sequential correction when ``npca_or_data`` is a
        NeuronPCA (the NeuronPCA keeps statistics, not data).
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
    goal = check_goals(explained_variance_goal, learnables_reduction_goal, flops_reduction_goal,
                       latency_reduction_goal)
    check_latency_goal(goal, latency_input)
    check_round_to(round_to, goal)
    needs_gradients = criterion == "auto" or criterion_named(criterion).needs_gradients
    check_allocation(allocation, goal)
    check_score_fn(score_fn)
    correction_data = correction_batches(correction, correction_data, npca_or_data)
    layers = select_layers(model, layer_names, exclude=exclude)
    tied = tied_left_out(model, layer_names, exclude)
    check_tie_correction(correction, layers, model)
    calls = None if latency_input is None else record_layer_calls(model, layers, latency_input)
    npca = npca_or_data if isinstance(npca_or_data, NeuronPCA) else NeuronPCA(
        model, npca_or_data, layer_names=list(layers), verbosity=verbosity, forward_fn=forward_fn,
        loss_fn=(loss_fn or "auto") if needs_gradients else None, validation=validation)
    check_statistics(npca, layers)
    flops = None if goal.kind != "flops_reduction" else flop_budget(
        model, layers, *flops_example(npca, flops_input), forward_fn=forward_fn, round_to=round_to or 1)
    cost = flops if goal.kind != "latency_reduction" else latency_budget(
        model, layers, calls, latency_input, unpack, progress=verbosity != "off")
    build = lambda options, choices: build_projected(  # noqa: E731 (one build per measured candidate)
        model, layers, options, Decisions(goal, choices, flops=flops))
    chosen, measured = how_to_decide(model, npca, layers, goal, build, criterion, allocation,
                                     forward_fn, score_fn, verbosity, cost)
    criterion, allocation = chosen.criterion, chosen.allocation
    npca = npca.with_regularization(chosen.regularization)
    options = measured_options(model, npca, layers, criterion, progress=verbosity != "off")
    learnables_before = count_learnables(model)
    bound = SequenceBound(layers, options, npca, goal)

    def decide(goal):  # -> choices, goal_reached, timings, kept dense
        if calls is None:
            choices, goal_reached = choose_ranks(options, goal, learnables_before, verbosity, allocation, cost)
            return bound(choices), goal_reached, {}, []
        return choose_faster_ranks(model, layers, options, calls, goal, learnables_before, unpack, verbosity,
                                   allocation, refine=bound, cost=cost)

    speed = None
    if goal.kind == "latency_reduction":
        built = lambda choices: build_projected(  # noqa: E731 (one build per measured round)
            model, layers, options, Decisions(goal, choices), unpack=unpack)[0]
        (choices, goal_reached, timings, kept_dense), speed, unreached = meet_latency_goal(
            goal, decide, built, model, latency_input, verbosity)
    else:
        choices, goal_reached, timings, kept_dense = decide(goal)
        left = {name: opts for name, opts in options.items() if name not in kept_dense}  # not kept for latency
        unreached = unreached_goal(goal, goal_reached, left, learnables_before, cost, kept_dense)
    decisions = Decisions(goal, choices, goal_reached, timings, kept_dense,
                          None if calls is None else str(latency.device_of(model, latency_input)),
                          excluded_layers(model, layer_names, layers, tied),
                          tie_warnings(tied) + unreached + bound.warnings, measured, flops, speed)
    for message in decisions.warnings:
        warnings.warn(message, UserWarning, stacklevel=2)
    compressed, info = build_projected(model, layers, options, decisions, unpack=unpack, inplace=inplace,
                                       correction_data=correction_data, forward_fn=forward_fn,
                                       verbosity=verbosity)
    _report(info, verbosity)
    return compressed, info


def build_projected(model: nn.Module, layers: dict, options: dict, decisions: Decisions, *,
                    unpack: bool = False, inplace: bool = False, build: bool = True,
                    correction_data=None, forward_fn=None, verbosity: str = "off"):
    """Turn explicit decisions into projected modules and the :class:`ProjectionInfo`.

    Each layer ``l`` of ``layers`` whose choice projects it is replaced by
    :func:`rankwise.layers.build.project_layer` at that choice (its bases ``Q[:, :r]`` from
    ``options[l]``); the info describes every layer of ``layers``. The network's learnables
    after are counted on the built model, or, with ``build=False`` (a dry run: the same
    decisions and the same records, no module built), as
    ``L - sum_l (L_l - L_l(choice_l))``.

    Parameters
    ----------
    model : torch.nn.Module
        The network holding ``layers``.
    layers : dict of str to torch.nn.Module
        The dense layers decided on, by qualified name, in model order.
    options : dict of str to LayerOptions
        Their options (:func:`rankwise.ranks.layer_options`).
    decisions : Decisions
        A choice per layer of ``layers`` and how they were reached.
    unpack : bool
        Build plain torch layers instead of :class:`ProjectedLayer` wrappers.
    inplace : bool
        Modify ``model`` itself instead of a copy.
    build : bool
        ``False``: build no module and return ``None`` as the model.
    correction_data : iterable, optional
        Build with the sequential correction on these batches
        (:func:`rankwise.correction.build_sequentially`).
    forward_fn : callable, optional
        Runs a batch of ``correction_data``.
    verbosity : str
        Anything but ``"off"`` shows the sequential correction's progress bar.

    Returns
    -------
    model : torch.nn.Module or None
        The compressed model (``None`` when ``build=False``).
    info : ProjectionInfo
    """
    learnables_before = count_learnables(model)
    projections = {name: describe_choice(name, layer, decisions.choices[name], decisions.timings.get(name),
                                         getattr(options[name], "space", "output"))
                   for name, layer in layers.items()}
    compressed = None
    if build and correction_data is not None:
        compressed = build_sequentially(model, layers, options, decisions.choices, correction_data,
                                        forward_fn=forward_fn, unpack=unpack, inplace=inplace,
                                        progress=None if verbosity == "off" else "sequential correction")
        learnables_after = count_learnables(compressed)
    elif build:
        replacements = {end: module for name, choice in decisions.choices.items() if choice.side != "dense"
                        for end, module in projected_modules(model, name, layers[name], options[name], choice,
                                                             unpack).items()}
        compressed = model if inplace else copy.deepcopy(model)
        for name, replacement in replacements.items():
            compressed.set_submodule(name, replacement)
        fused_paths_off(compressed)
        learnables_after = count_learnables(compressed)
    else:
        learnables_after = learnables_before - sum(p.learnables_before - p.learnables_after
                                                   for p in projections.values())
    info = ProjectionInfo(decisions.goal, decisions.goal_reached, learnables_before, learnables_after,
                          projections, list(decisions.kept_dense_for_latency), decisions.latency_device,
                          list(decisions.excluded), list(decisions.warnings), decisions.measured,
                          *(() if decisions.flops is None else
                            (decisions.flops.network_flops, decisions.flops.flops_after(decisions.choices))),
                          **({} if decisions.speed is None else
                             {"latency_before": decisions.speed.seconds_before,
                              "latency_after": decisions.speed.seconds_after}))
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
        expected, found = kind_of(layer).statistics_shape(layer), npca.statistics(name, settle=False).shape
        if found != expected:
            raise ValueError(f"npca_or_data: layer {name!r} has shape {expected} in the model but "
                             f"{found} in the NeuronPCA; it was computed on another model.")


def _report(info: ProjectionInfo, verbosity: str) -> None:
    if verbosity in ("steps", "iterations"):
        for p in info.layers.values():
            print(f"{p.name}: {p.side} (rank in {format_ranks(p.rank_in)}, rank out {format_ranks(p.rank_out)}), "
                  f"{p.learnables_before:,} -> {p.learnables_after:,} learnables, "
                  f"explained variance {p.explained_variance:.4f}")
    if verbosity != "off":
        print(info.table())
