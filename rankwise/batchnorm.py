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

from rankwise.batches import default_forward, model_device, move_to
from rankwise.checks import check_max_batches
from rankwise.kinds import is_batchnorm, kind_of
from rankwise.metric import batchnorm_scale, following_batchnorms


@torch.no_grad()
def _fold_pair(layer, norm):
    """Write ``D W`` and ``D (b - m) + beta`` into `layer` (which gains a bias if it had none);
    ``W`` as its kind reads it (:meth:`rankwise.kinds.LayerKind.weight`, a view of the stored weight)."""
    scale = batchnorm_scale(norm)
    shift = norm.bias if norm.affine else torch.zeros_like(scale)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
    folded_bias = scale * (bias - norm.running_mean) + shift
    weight = kind_of(layer).weight(layer)
    weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))))
    layer.bias = nn.Parameter(folded_bias.to(layer.weight.dtype))


def _foldable(module: nn.Module) -> bool:
    """Whether a following BatchNorm can be folded into ``module``: a layer of a family with
    :attr:`~rankwise.kinds.Family.batchnorm_after` (``Linear``, convolutions, GPT-2's ``Conv1D``)."""
    kind = kind_of(module)
    return kind is not None and kind.traits.batchnorm_after


def fold_batchnorm(model):
    """A copy of `model` with every eval-mode BatchNorm that directly follows a layer folded into it.

    A layer of the dense family (``Linear``, ``Conv1d/2d/3d``, GPT-2's ``Conv1D``, a kind registered
    with :func:`rankwise.register_kind`) whose output feeds only a ``BatchNorm1d/2d/3d``
    of matching width (read from the graph with ``torch.fx``, else from the order of an
    ``nn.Sequential``'s children: :func:`rankwise.metric.following_batchnorms`) becomes ``W' = D W``, ``b' = D (b - m) + beta`` with
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
    layers = {name: m for name, m in folded.named_modules() if _foldable(m)}
    modules = {id(m): name for name, m in folded.named_modules()}
    mapping = {name: modules[id(norm)] for name, norm in following_batchnorms(folded, layers).items()}
    for layer_name, norm_name in mapping.items():
        _fold_pair(folded.get_submodule(layer_name), folded.get_submodule(norm_name))
        parent, _, child = norm_name.rpartition(".")
        setattr(folded.get_submodule(parent) if parent else folded, child, nn.Identity())
    return folded, mapping


def _check_recalibration(model, data, max_batches):
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}.")
    check_max_batches(max_batches)
    if isinstance(data, torch.Tensor) or not hasattr(data, "__iter__"):
        raise ValueError("data: expected an iterable of batches (e.g. a DataLoader or a list of "
                         "tensors), not a single tensor; wrap it as [tensor].")
    norms = [m for m in model.modules() if is_batchnorm(m) and m.track_running_stats]
    if not norms:
        raise ValueError("model: it has no BatchNorm layer tracking running statistics to recalibrate.")
    return norms


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
            (forward_fn or default_forward)(model, move_to(batch, model_device(model)))
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
