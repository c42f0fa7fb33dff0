"""BatchNorm folding and recalibration.

An eval-mode BatchNorm computes, per channel ``c``,
``z_c = gamma_c (y_c - m_c) / sqrt(v_c + eps) + beta_c = d_c y_c + (beta_c - d_c m_c)`` with
``d_c = gamma_c / sqrt(v_c + eps)`` (``gamma = 1, beta = 0`` without ``affine``) and ``m, v`` its
running mean and variance. Following a layer ``y = W x + b``, it is the layer
``z = (D W) x + D (b - m) + beta``, ``D = diag(d)``: :func:`fold_batchnorm` builds it. ``D`` is
also the metric in which the layer's output error reaches the rest of the network: a
channel of small variance that BN divides by its small standard deviation matters as much as
any other after the BN.
"""

import copy

import torch
from torch import nn

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorm_scale(norm):
    """``d = gamma / sqrt(running_var + eps)`` of an eval-mode BatchNorm (``gamma = 1`` without affine)."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    return scale * norm.weight if norm.affine else scale


def _layer_batchnorm_pairs(model):
    """``(layer name, BN name)`` for each Linear/Conv immediately followed, in an ``nn.Sequential``,
    by a BatchNorm with running statistics and as many channels as the layer has outputs."""
    pairs = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name, layer), (next_name, norm) in zip(children, children[1:]):
            if isinstance(layer, _LAYERS) and isinstance(norm, _NORMS) and \
                    norm.running_var is not None and norm.num_features == layer.weight.shape[0]:
                join = f"{prefix}." if prefix else ""
                pairs.append((join + name, join + next_name))
    return pairs


@torch.no_grad()
def _fold_pair(layer, norm):
    """Write ``D W`` and ``D (b - m) + beta`` into `layer` (which gains a bias if it had none)."""
    scale = batchnorm_scale(norm)
    shift = norm.bias if norm.affine else torch.zeros_like(scale)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
    folded_bias = scale * (bias - norm.running_mean) + shift
    layer.weight.mul_(scale.view(-1, *([1] * (layer.weight.dim() - 1))))
    layer.bias = nn.Parameter(folded_bias.to(layer.weight.dtype))


def fold_batchnorm(model):
    """A copy of `model` with every eval-mode BatchNorm that directly follows a layer folded into it.

    A ``Linear`` / ``Conv1d`` / ``Conv2d`` / ``Conv3d`` followed in the same ``nn.Sequential`` by a
    ``BatchNorm1d/2d/3d`` of matching width becomes ``W' = D W``, ``b' = D (b - m) + beta`` with
    ``D = diag(gamma / sqrt(v + eps))`` (see the module docstring), and the BatchNorm becomes
    ``nn.Identity``. In eval mode the copy computes exactly what `model` computes (up to
    rounding); `model` is not modified.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    folded : torch.nn.Module
        The folded copy, in the training mode `model` had.
    mapping : dict
        ``{layer name: BatchNorm name}`` of the folded pairs (names in `model`).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}.")
    folded = copy.deepcopy(model)
    mapping = dict(_layer_batchnorm_pairs(folded))
    for layer_name, norm_name in mapping.items():
        _fold_pair(folded.get_submodule(layer_name), folded.get_submodule(norm_name))
        parent, _, child = norm_name.rpartition(".")
        setattr(folded.get_submodule(parent) if parent else folded, child, nn.Identity())
    return folded, mapping


def _check_recalibration(model, data, max_batches):
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}.")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches: expected a positive integer or None, got {max_batches!r}.")
    if isinstance(data, torch.Tensor) or not hasattr(data, "__iter__"):
        raise ValueError("data: expected an iterable of batches (e.g. a DataLoader or a list of "
                         "tensors), not a single tensor; wrap it as [tensor].")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        raise ValueError("model: it has no BatchNorm layer tracking running statistics to recalibrate.")
    return norms


def _run_batch(model, batch, forward_fn):
    if forward_fn is not None:
        return forward_fn(model, batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(**batch) if isinstance(batch, dict) else model(batch)


@torch.no_grad()
def recalibrate_batchnorm(model, data, forward_fn=None, max_batches=None):
    """Re-estimate the running mean and variance of every BatchNorm of `model` on `data`.

    After compression the statistics a BatchNorm stored no longer describe its input. Each BN
    is put in train mode (all other modules keep their mode) with ``momentum=None``, so that
    after ``K`` batches its running statistics are the cumulative averages
    ``m = (1/K) sum_k mean_k``, ``v = (1/K) sum_k var_k`` of the per-batch mean and unbiased
    variance of its input (for batches of equal size, the mean equals the mean over all the
    data). Modes, momenta and learnables are then restored; only the running statistics and
    ``num_batches_tracked`` change.

    Parameters
    ----------
    model : torch.nn.Module
        Modified in place.
    data : iterable
        Batches: tensors, ``(input, target)`` tuples (the first element is the input) or dicts
        of keyword arguments.
    forward_fn : callable, optional
        ``forward_fn(model, batch)`` runs one batch, for anything the rules above miss.
    max_batches : int, optional
        Use at most this many batches.

    Returns
    -------
    model : torch.nn.Module
        The same model.

    Raises
    ------
    ValueError
        On bad arguments, a model without BatchNorm, or empty `data`; the model is left as it was.
    """
    norms = _check_recalibration(model, data, max_batches)
    saved = [(m.training, m.momentum, m.running_mean.clone(), m.running_var.clone(),
              m.num_batches_tracked.clone()) for m in norms]
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        seen = 0
        for batch in data:
            if max_batches is not None and seen >= max_batches:
                break
            _run_batch(model, batch, forward_fn)
            seen += 1
        if seen == 0:
            raise ValueError("data: it yielded no batch.")
    except BaseException:
        for norm, (_, _, mean, var, count) in zip(norms, saved):
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.num_batches_tracked.copy_(count)
        raise
    finally:
        for norm, (training, momentum, *_) in zip(norms, saved):
            norm.train(training)
            norm.momentum = momentum
    return model
