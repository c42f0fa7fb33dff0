"""Moments of the activations a width's consumers see, for the least-squares refits.

For each consumer of a width, a forward pre-hook takes the consumer's input, keeps the width's
channels and accumulates their float64 moments (``rankwise.moments.Moments``: count, sum and
``sum z z^T``) over every *row*: one sample of a ``Linear`` input (leading dimensions pooled),
one spatial position of a convolution input, or one position of a flattened channel block
(the ``block`` features of channel ``c`` after a Flatten are the values of that channel at
every spatial position, so they are rows of the same channel vector).
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.evolve.widths import Consumer
from rankwise.kinds import channels_last
from rankwise.moments import Moments
from rankwise.batches import model_device, run_batches


def channel_rows(inputs: torch.Tensor, consumer: Consumer, width: int, linear: bool) -> torch.Tensor:
    """``(rows, width)`` values of the width's channels in a consumer's input.

    A ``Linear`` input ``(..., C * block)`` is viewed as ``(..., C, block)``; a convolution
    input ``(N, C, *spatial)`` has the channels on axis 1.
    """
    start, stop = consumer.offset, consumer.offset + width
    if linear:
        blocks = inputs.reshape(*inputs.shape[:-1], -1, consumer.block)[..., start:stop, :]
        return blocks.movedim(-1, -2).reshape(-1, width)
    return inputs[:, start:stop].movedim(1, -1).reshape(-1, width)


def consumer_moments(model: nn.Module, groups: list, data, forward_fn=None) -> dict:
    """Run ``data`` through ``model`` (eval mode, no gradients) and collect consumer-input moments.

    Parameters
    ----------
    model : torch.nn.Module
    groups : list of WidthGroup
        The widths whose consumers are observed.
    data : iterable
        Batches: a tensor is the input, a tuple or list starts with it, a dict is keyword
        arguments (or anything ``forward_fn(model, batch)`` accepts).
    forward_fn : callable, optional

    Returns
    -------
    dict
        ``{(group name, index of the consumer in group.consumers): Moments}``.
    """
    modules = dict(model.named_modules())
    moments, handles = {}, []
    for group in groups:
        for index, consumer in enumerate(group.consumers):
            moments[group.name, index] = Moments.zeros(group.width, device=model_device(model))
            handles.append(modules[consumer.name].register_forward_pre_hook(
                _hook(moments[group.name, index], consumer, group.width,
                      channels_last(modules[consumer.name]))))
    run_batches(model, data, handles, forward_fn,
                empty_message="data: the iterable yielded no batch; pass recent training batches "
                              "(a list of tensors or (inputs, targets) tuples), or data=None.")
    return moments


def _hook(moments: Moments, consumer: Consumer, width: int, linear: bool):
    def hook(module, args):
        moments.update(channel_rows(args[0].detach(), consumer, width, linear))
    return hook
