"""Latency-aware projection: keep dense the layers whose projected form is not faster.

Fewer learnables do not always make a layer faster (a factored layer runs two or three
smaller kernels instead of one). Once the ranks are chosen, every layer to be projected is
timed in isolation, dense and projected (:func:`rankwise.median_latency`, on the arguments the
layer received when the model ran on ``latency_input``; a tied token table and output head
timed at both ends, :func:`form_seconds`). A layer with ``t_projected >= t_dense``
is kept dense and leaves the analysed set; ranks are chosen again over the remaining layers and
the newly chosen forms timed, until no layer is excluded (at most one round per layer). See
:func:`rankwise.compress_network_using_projection` for the user's side of it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from rankwise import latency
from rankwise.batches import as_call, eval_mode
from rankwise.goals import Goal
from rankwise.layers.build import projected_modules
from rankwise.ranks import LayerOptions, choose_ranks
from rankwise.tables import format_ranks
from rankwise.ties import tied_pairs


def record_layer_calls(model: nn.Module, layers: dict, latency_input) -> dict[str, tuple[tuple, dict]]:
    """The arguments each layer receives when ``model`` runs on ``latency_input``.

    The model runs once in eval mode under ``torch.no_grad()`` with forward hooks on
    ``layers`` (and on the output head of each tied token table among them); each layer's
    positional and keyword arguments at its first call are kept (tensors detached and copied;
    an LSTM's ``hx`` or a ``PackedSequence`` as they come).

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
        args, kwargs = as_call(latency_input)
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

    heads = {head: model.get_submodule(head) for table, head in tied_pairs(model).items() if table in layers}
    handles = [layer.register_forward_hook(recorder(name), with_kwargs=True)
               for name, layer in {**layers, **heads}.items()]
    try:
        with eval_mode(model), torch.no_grad():
            model(*args, **kwargs)
    except Exception as error:
        raise ValueError(f"latency_input: the model's forward failed on it ({type(error).__name__}: "
                         f"{error}); pass a batch the model accepts.") from error
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in {**layers, **heads} if name not in calls]
    if missing:
        raise ValueError(f"latency_input: the model's forward on it does not call layer(s) "
                         f"{', '.join(map(repr, missing))}, so their latency cannot be measured; pass a "
                         "batch that runs every analysed layer, or leave these layers out with layer_names.")
    return calls


def choose_faster_ranks(model: nn.Module, layers: dict, options: dict[str, LayerOptions], calls: dict, goal: Goal,
                        network_learnables: int, unpack: bool, verbosity: str = "off",
                        allocation: str = "global", refine=None, cost=None):
    """:func:`choose_ranks`, keeping dense the layers whose projected form is not faster.

    Each round chooses ranks over the layers not yet excluded (when those cannot reach the
    goal, each keeps its choice of the first round instead of being cut to its smallest form:
    the goal of the excluded layers is not moved onto them), times every layer to be
    projected (dense and projected, on its recorded arguments, unless it was timed at the same
    choice before) and excludes those whose projected form takes at least as long; rounds stop
    when none is excluded.

    Parameters
    ----------
    model : torch.nn.Module
        The network holding ``layers``.
    layers : dict of str to torch.nn.Module
        The analysed dense layers.
    options : dict of str to LayerOptions
    calls : dict of str to (tuple, dict)
        Each layer's recorded arguments (:func:`record_layer_calls`).
    goal, network_learnables, verbosity, allocation, cost
        As for :func:`choose_ranks`.
    unpack : bool
        Time the projected forms as plain torch layers (as they will be built).
    refine : callable, optional
        ``refine(choices) -> choices``, applied to each round's choices before they are timed
        (e.g. :class:`rankwise.ranks.SequenceBound`).

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
    first = None
    for _ in range(len(options) + 1):  # every round but the last excludes a layer
        active = {name: opts for name, opts in options.items() if name not in rejected}
        choices, goal_reached = choose_ranks(active, goal, network_learnables, verbosity, allocation, cost)
        if refine is not None:
            choices = refine(choices)
        if first is None:
            first = choices
        elif not goal_reached:  # the layers left cannot reach the goal: no deeper cut than their first
            choices = {name: first[name] for name in active}
        slower = {}
        for name, choice in choices.items():
            if choice.side == "dense":
                continue
            key = (name, choice.side, choice.rank_in, choice.rank_out)
            if key not in measured:
                dense = options[name].choice(options[name].dense_index)
                measured[key] = tuple(form_seconds(model, name, layers[name], options[name], form, calls, unpack)
                                      for form in (dense, choice))
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
    choices = {name: choices[name] if name in choices else options[name].choice(options[name].dense_index) for name in options}
    return choices, goal_reached, timings, [name for name in options if name in rejected]


def form_seconds(model: nn.Module, name: str, layer: nn.Module, options: LayerOptions, choice, calls: dict,
                 unpack: bool = False) -> float:
    """Median seconds of layer ``name`` in the form of ``choice`` (dense or projected) on its
    recorded call; a tied token table's also those of its output head, the two summed."""
    if choice.side != "dense":
        ends = projected_modules(model, name, layer, options, choice, unpack)
    else:
        head = getattr(options, "head", "")
        ends = {name: layer, **({head: model.get_submodule(head)} if head else {})}
    return sum(time_layer(module, calls[end]) for end, module in ends.items())


def time_layer(layer: nn.Module, call: tuple[tuple, dict]) -> float:
    """Median seconds of ``layer(*args, **kwargs)`` on one recorded call (:func:`record_layer_calls`)."""
    args, kwargs = call
    return latency.median_latency(_WithKeywords(layer, kwargs) if kwargs else layer, args)


class _WithKeywords(nn.Module):
    """``layer(*args, **kwargs)`` with fixed ``kwargs``, to time a call that has some."""

    def __init__(self, layer: nn.Module, kwargs: dict):
        super().__init__()
        self.layer, self.kwargs = layer, kwargs

    def forward(self, *args):
        return self.layer(*args, **self.kwargs)


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
