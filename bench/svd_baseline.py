"""Data-free baseline: uniform truncated SVD of every Linear and Conv2d weight.

Each layer's weight, matricised as ``W`` of shape ``(out, in * kh * kw)`` with full rank
``R = min(out, in * kh * kw)``, is replaced by its rank-``r`` truncated SVD
``W ~ U_r S_r V_r^T`` with ``r = max(1, round(fraction * R))``, the same ``fraction`` for every
layer:

- ``Linear(in, out)`` -> ``Linear(in, r, bias=False)`` (weight ``S_r V_r^T``) then
  ``Linear(r, out)`` (weight ``U_r``, the original bias);
- ``Conv2d`` -> a conv with the original kernel, stride, padding and dilation producing ``r``
  channels (weight ``S_r V_r^T`` reshaped to ``(r, in, kh, kw)``, no bias), then a 1x1 conv
  ``r -> out`` (weight ``U_r``, the original bias).

A layer stays dense where this factored form would not have fewer learnables (and grouped
convolutions always do). `match_learnables` finds, by bisection on ``fraction``, the network
whose learnables are closest to a target. Plain torch: this is a peer of rankwise, not a
part of it.
"""

import copy

import torch
from torch import nn


def is_factorable(layer):
    """Linear and ungrouped Conv2d layers are factored; everything else is left alone."""
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1)


def layer_sizes(layer):
    """``(out, in * kernel)``: the matricised weight's shape."""
    return layer.weight.shape[0], layer.weight[0].numel()


def layer_rank(layer, fraction):
    """Rank kept at `fraction` of the full rank ``min(out, in * kernel)``, at least 1."""
    return max(1, round(fraction * min(layer_sizes(layer))))


def factored_learnables(layer, rank):
    """Learnables of the rank-`rank` factored form: both factors and the original bias."""
    out_size, in_size = layer_sizes(layer)
    return rank * (in_size + out_size) + (out_size if layer.bias is not None else 0)


def dense_learnables(layer):
    return sum(p.numel() for p in layer.parameters())


def keeps_dense(layer, rank):
    """True where the factored form would not be smaller than the layer itself."""
    return factored_learnables(layer, rank) >= dense_learnables(layer)


def svd_learnables(model, fraction):
    """Learnables of ``svd_compress(model, fraction)`` without building it."""
    total = 0
    for module in model.modules():
        if is_factorable(module):
            rank = layer_rank(module, fraction)
            total += dense_learnables(module) if keeps_dense(module, rank) else factored_learnables(module, rank)
        else:
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


@torch.no_grad()
def factored_pair(layer, first_weight, second_weight, bias=None):
    """The two-layer ``nn.Sequential`` ``x -> second (first x) + bias`` standing for `layer`.

    `first_weight` is ``(rank, in * kernel)`` (a conv with `layer`'s kernel, stride, padding and
    dilation for a ``Conv2d``), `second_weight` ``(out, rank)`` (a 1x1 conv for a ``Conv2d``);
    `bias` defaults to `layer`'s own (none if it has none).
    """
    out_size, _ = layer_sizes(layer)
    rank = first_weight.shape[0]
    bias = layer.bias if bias is None else bias
    if isinstance(layer, nn.Linear):
        first = nn.Linear(layer.in_features, rank, bias=False)
        second = nn.Linear(rank, out_size, bias=bias is not None)
    else:
        first = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, stride=layer.stride,
                          padding=layer.padding, dilation=layer.dilation, bias=False,
                          padding_mode=layer.padding_mode)
        second = nn.Conv2d(rank, out_size, 1, bias=bias is not None)
    dtype = layer.weight.dtype
    first.weight.copy_(first_weight.to(dtype).reshape(first.weight.shape))
    second.weight.copy_(second_weight.to(dtype).reshape(second.weight.shape))
    if bias is not None:
        second.bias.copy_(bias.to(dtype))
    return nn.Sequential(first, second).to(layer.weight.device)


@torch.no_grad()
def factor_layer(layer, rank):
    """The two-layer ``nn.Sequential`` computing the rank-`rank` truncated SVD of `layer`."""
    out_size, _ = layer_sizes(layer)
    u, s, vh = torch.linalg.svd(layer.weight.reshape(out_size, -1).double(), full_matrices=False)
    return factored_pair(layer, s[:rank, None] * vh[:rank], u[:, :rank])


def svd_compress(model, fraction, force=False):
    """A copy of `model` with every factorable layer replaced by its truncated SVD.

    Parameters
    ----------
    model : torch.nn.Module
    fraction : float
        Fraction of each layer's full rank kept.
    force : bool, default False
        Factor even where the factored form is not smaller (for checks at full rank).
    """
    compressed = copy.deepcopy(model)
    targets = [(name, m) for name, m in compressed.named_modules() if is_factorable(m)]
    for name, layer in targets:
        rank = layer_rank(layer, fraction)
        if force or not keeps_dense(layer, rank):
            parent_name, _, child_name = name.rpartition(".")
            setattr(compressed.get_submodule(parent_name), child_name, factor_layer(layer, rank))
    return compressed


def match_learnables(model, target, iterations=60):
    """The fraction whose `svd_learnables` is closest to `target`, found by bisection.

    `svd_learnables` is non-decreasing in the fraction, so bisection brackets the step where
    it crosses `target`; of the two sides of that step, the closer one is returned.

    Returns
    -------
    fraction : float
    learnables : int
    """
    low, high = 0.0, 1.0
    for _ in range(iterations):
        middle = (low + high) / 2
        if svd_learnables(model, middle) < target:
            low = middle
        else:
            high = middle
    candidates = [(abs(svd_learnables(model, f) - target), f) for f in (low, high)]
    fraction = min(candidates)[1]
    return fraction, svd_learnables(model, fraction)
