"""One calibration pass: the moments of every analysed layer, and optionally their gradients.

:func:`gather` registers one forward hook per layer (the statistics class of its kind's family
makes it, :func:`rankwise.statistics.statistics_for`), runs the batches
(:mod:`rankwise.batches`; one block at a time with ``blocks``, :mod:`rankwise.blockwise`; with a
backward pass per batch for ``loss_fn``, :mod:`rankwise.statistics.gradients`), and sums the
moments over a ``torch.distributed`` process group (:mod:`rankwise.distributed`).
:class:`~rankwise.NeuronPCA` holds the result.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from rankwise.batches import as_batches, model_device, run_batches
from rankwise.blockwise import calibrate_blockwise
from rankwise.distributed import (active_group, all_gather_count, all_reduce_count, all_reduce_tensors,
                                  broadcast_from_first, raise_on_every_rank)
from rankwise.kinds import kind_of
from rankwise.statistics import moment_tensors, statistics_for
from rankwise.statistics.dense import sharing_inputs
from rankwise.statistics.gradients import AUTO_GRADIENT_EVERY, InputOf, empty_gradient_moments, gradient_moments
from rankwise.ties import tied_pairs

HEAD_INPUT = " head input"
"""The suffix of a tied table's name under which its head's input gradients are kept."""

NO_BATCH = ("data: the iterable yielded no batch. Pass a DataLoader or a list of tensors holding "
            "representative inputs.")


@dataclass
class Gathered:
    """The outcome of a pass: per layer its statistics, the batches run, and with a loss the
    moments of the output gradients of :func:`gradient_layers` and the samples they saw."""

    stats: dict
    num_batches: int = 0
    gradients: dict = field(default_factory=dict)
    gradient_samples: int = 0


def gather(model: nn.Module, data, layers: dict, forward_fn=None, max_batches: int | None = None,
           show_progress: bool = False, loss_fn=None, process_group=None, blocks=None, device=None) -> Gathered:
    """The statistics of ``layers`` over one pass of ``data`` (see :class:`~rankwise.NeuronPCA`
    for the arguments), summed over ``process_group``.

    Raises
    ------
    ValueError
        When no batch was run (on any rank of the group), or the model rejects a batch.
    """
    pairs = tied_pairs(model)
    gathered = Gathered({name: statistics_for(m) if name not in pairs else
                         statistics_for(m).tied_to(pairs[name], model.get_submodule(pairs[name]))
                         for name, m in layers.items()})
    _calibrate_shard(gathered, model, data, layers, forward_fn, max_batches, show_progress, loss_fn,
                     process_group, blocks, device)
    _sum_over(gathered, process_group)
    return gathered


def gradient_layers(layers: dict, model: nn.Module | None = None) -> dict:
    """The layers that get gradient statistics with ``loss_fn``: the dense and embedding ones
    (recurrent and attention layers have no loss criterion); with ``model``, also the input of
    the head tied to each table of ``layers`` (:class:`~rankwise.statistics.gradients.InputOf`,
    under the table's name followed by :data:`HEAD_INPUT`)."""
    chosen = {name: layer for name, layer in layers.items() if kind_of(layer).traits.gradients}
    pairs = {} if model is None else tied_pairs(model)
    return {**chosen, **{name + HEAD_INPUT: InputOf(model.get_submodule(pairs[name])) for name in chosen
                         if name in pairs}}


def _calibrate(gathered: Gathered, model, data, layers, forward_fn, max_batches, show_progress, loss_fn, blocks,
               device) -> None:
    """One pass over ``data``: the activation hooks (layers reading the same input tensor share
    its batch moments, forgotten as each batch starts), and with ``loss_fn`` the gradients; with
    ``blocks``, one block at a time (:mod:`rankwise.blockwise`). The runners remove the hooks."""
    with sharing_inputs() as shared:
        handles = [layer.register_forward_hook(gathered.stats[name].hook(name, layer), with_kwargs=True)
                   for name, layer in layers.items()]
        handles += [model.get_submodule(stats.head).register_forward_hook(stats.head_hook(stats.head), with_kwargs=True)
                    for stats in gathered.stats.values() if getattr(stats, "head", None) is not None]
        handles.append(model.register_forward_pre_hook(lambda *_: shared.clear()))
        progress = "NeuronPCA" if show_progress else None
        if blocks is not None:
            gathered.num_batches = calibrate_blockwise(model, data, gathered.stats, handles, blocks, device,
                                                       forward_fn, max_batches, progress, NO_BATCH)
        elif loss_fn is None:
            gathered.num_batches = run_batches(model, data, handles, forward_fn, max_batches, progress=progress,
                                               empty_message=NO_BATCH)
        else:
            gathered.gradients, gathered.gradient_samples, gathered.num_batches = gradient_moments(
                model, data, gradient_layers(layers, model), loss_fn, forward_fn, max_batches, progress, handles=handles,
                every=AUTO_GRADIENT_EVERY if loss_fn == "auto" else 1)


def _calibrate_shard(gathered: Gathered, model, data, layers, forward_fn, max_batches, show_progress, loss_fn,
                     process_group, blocks, device) -> None:
    """:func:`_calibrate` on this rank's shard. Under a group of several ranks, a shard that
    yields no batch adds nothing (legal as long as the group saw some), and a rank that fails
    makes every rank raise (:func:`~rankwise.distributed.raise_on_every_rank`) instead of
    leaving the others waiting in the sums."""
    if active_group(process_group) is None:
        _calibrate(gathered, model, data, layers, forward_fn, max_batches, show_progress, loss_fn, blocks, device)
        return
    shard = _Counted(as_batches(data))
    failure = None
    try:
        _calibrate(gathered, model, shard, layers, forward_fn, max_batches, show_progress, loss_fn, blocks, device)
    except Exception as error:  # every rank must hear of it, whatever it is
        if shard.yielded or not isinstance(error, ValueError):
            failure = error
        elif loss_fn is not None:  # an empty shard: zero gradient moments, shaped as the others'
            gathered.gradients = empty_gradient_moments(gradient_layers(layers, model), model_device(model))
    raise_on_every_rank(failure, process_group)


def _sum_over(gathered: Gathered, process_group) -> None:
    """Sum the moments over ``process_group`` (nothing outside an initialised group); the
    recurrent layers' reservoirs of calibration sequences are those of the group's first rank
    that saw a batch."""
    tensors = [t for stats in gathered.stats.values() for t in moment_tensors(stats)]
    tensors += [t for moments in gathered.gradients.values() for t in moments.tensors()]
    all_reduce_tensors(tensors, process_group)
    batches = all_gather_count(gathered.num_batches, process_group)
    gathered.num_batches = sum(batches)
    if gathered.num_batches == 0:
        raise ValueError(NO_BATCH)
    sampled = [stats for stats in gathered.stats.values() if getattr(stats, "reservoir", None) is not None]
    if sampled:
        first = next(rank for rank, count in enumerate(batches) if count)
        reservoirs = broadcast_from_first([stats.reservoir for stats in sampled], process_group, first)
        for stats, reservoir in zip(sampled, reservoirs):
            stats.reservoir = reservoir
    gathered.gradient_samples = all_reduce_count(gathered.gradient_samples, process_group)


class _Counted:
    """An iterable of batches that counts those it yielded (``yielded``), so that a rank can
    tell an empty shard from a failed batch."""

    def __init__(self, batches):
        self.batches, self.yielded = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.yielded += 1
            yield batch

    def __len__(self) -> int:
        return len(self.batches)  # a TypeError for an iterable without a length, as len() raises


class ThinDataWarning(UserWarning):
    """A layer saw fewer observations than its width: its statistics are regularised."""


def check_observations(stats: dict) -> None:
    """Raise for a layer with fewer than 2 observations; one :class:`ThinDataWarning` naming
    every layer that saw fewer observations than its width."""
    thin = []
    for name, layer_stats in stats.items():
        count = int(layer_stats.input.count)
        if count < 2:
            raise ValueError(f"data: layer {name!r} saw {count} observation(s); at least 2 are "
                             "needed for a covariance. Pass more or larger batches.")
        if count < layer_stats.width:
            thin.append(f"{name} ({count} for {layer_stats.width})")
    if thin:
        shown = ", ".join(thin[:8]) + (f" and {len(thin) - 8} more" if len(thin) > 8 else "")
        warnings.warn(f"{len(thin)} layer(s) saw fewer observations than their width: {shown}. Their "
                      "covariances are rank-deficient and are regularised toward the spectra of "
                      "their weights; more calibration data gives better projections.",
                      ThinDataWarning, stacklevel=3)
