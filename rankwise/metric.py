"""Where a layer's error is measured: a metric on its output space.

The variance criterion measures the error ``d = y - y'`` of a layer's output by ``|d|^2``. That
is the wrong space when the network does not treat the output directions alike:

- an eval-mode BatchNorm right after the layer divides channel ``c`` by
  ``sigma_c = sqrt(var_c + eps)`` and multiplies it by ``gamma_c``, so the error that reaches the
  rest of the network is ``|D d|^2`` with ``D = diag(gamma / sigma)``: low-variance channels,
  which an unweighted PCA drops first, are exactly the ones BatchNorm amplifies;
- the loss of the network changes by about ``1/2 d^T G d``, ``G`` the Fisher information of the
  layer's output (:mod:`rankwise.gradients`).

Both are a positive semi-definite metric ``M`` (``M = D^2``, or ``M = G``), and the error of an
option is ``E |d|_M^2 = E |R d|^2`` with ``R = M^(1/2)``. Measuring in ``M`` is the same as
analysing the *whitened* layer ``y~ = R y = (R W) x + R b``: its output covariance is
``R C_y R``, its mean ``R mu_y``, its weight Grams ``R W W^T R`` and ``sum_k W_k^T M W_k``, and
its input statistics are the layer's own. So every decision rankwise makes with the variance
criterion carries over unchanged to the whitened statistics (:func:`whitened_statistics`),
and the projected form of the whitened layer, followed by ``R^-1`` on its output
(:func:`unwhiten_output`), is the projected form of the original layer:

    y ~ mu_y + R^-1 U U^T R (W x + b - mu_y),     U = top eigenvectors of R C_y R,

an oblique projection, exact at full rank, whose discarded eigenvalues of ``R C_y R`` are the
error in ``M``. For ``M = G`` and uncentred moments this is the truncated SVD of
``G^(1/2) W S_x^(1/2)``, the Fisher-weighted / whitened SVD of FWSVD and SVD-LLM.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.kinds import is_batchnorm, kind_of
from rankwise.moments import Moments
from rankwise.solvers import descending_eigh, solver_dtype

FLOOR = 1e-6  # smallest eigenvalue of R kept, relative to the largest (R must be invertible)


@dataclass(frozen=True)
class OutputMetric:
    """``R = M^(1/2)`` and ``R^-1`` of a metric on an output space of dimension ``d``.

    Attributes
    ----------
    root : torch.Tensor
        ``(d, d)`` float64, symmetric positive definite.
    inverse_root : torch.Tensor
        ``(d, d)`` float64, its inverse.
    """

    root: torch.Tensor
    inverse_root: torch.Tensor

    @classmethod
    def diagonal(cls, scale: torch.Tensor) -> "OutputMetric":
        """``M = diag(scale)^2``, e.g. a BatchNorm's ``gamma / sigma`` (zeros floored)."""
        scale = scale.detach().to(torch.float64).abs()
        scale = scale.clamp_min(FLOOR * float(scale.max().clamp_min(torch.finfo(torch.float64).tiny)))
        return cls(torch.diag(scale), torch.diag(1.0 / scale))

    @classmethod
    def from_gram(cls, gram: torch.Tensor, shrinkage: float, count: float = 0) -> "OutputMetric":
        """``M = (1 - a) G + a (tr G / d) I`` from a Gram ``G`` (e.g. a Fisher information) of
        ``count`` samples (``0``: unknown), decomposed in the precision they allow
        (:func:`rankwise.solvers.solver_dtype`).

        The shrinkage ``a`` in ``[0, 1]`` pulls the metric toward isotropy where the
        calibration data are too few to be trusted (``a = 1``: every direction alike).
        """
        gram = (gram.detach().to(torch.float64) + gram.detach().to(torch.float64).T) / 2
        dim = len(gram)
        level = gram.trace() / dim
        if level <= 0:
            identity = torch.eye(dim, dtype=torch.float64, device=gram.device)
            return cls(identity, identity)
        shrunk = (1 - shrinkage) * gram + shrinkage * level * torch.eye(dim, dtype=torch.float64,
                                                                         device=gram.device)
        values, vectors = descending_eigh(shrunk, solver_dtype(dim, count))
        roots = values.sqrt()
        roots = roots.clamp_min(FLOOR * float(roots.max()))
        return cls(vectors @ torch.diag(roots) @ vectors.T, vectors @ torch.diag(1.0 / roots) @ vectors.T)

    @property
    def trace(self) -> float:
        """``tr M``."""
        return float(self.root.square().sum())


def whitened_statistics(stats, layer: nn.Module, metric: OutputMetric):
    """The statistics the whitened layer ``(R W, R b)`` would have gathered on the same data.

    Parameters
    ----------
    stats : LayerStatistics
        A dense layer's statistics (see :mod:`rankwise.pca`).
    layer : torch.nn.Module
        The dense layer they belong to.
    metric : OutputMetric
        On the layer's output channels.

    Returns
    -------
    LayerStatistics
        Output moments ``(n, R s, R S R)``, the same input moments, and the Grams of ``R W``;
        statistics kept factored (``stats.factored``: an expanding ``Linear`` layer, output
        moments not formed) stay so, with ``R W`` and ``R b`` as their weight and bias.
    """
    if getattr(stats, "factored", False):
        root = metric.root.to(stats.weight_matrix.device)
        bias = None if stats.bias_vector is None else root @ stats.bias_vector.to(torch.float64)
        return dataclasses.replace(stats, weight_matrix=whitened_weight(layer, metric), bias_vector=bias)
    root = metric.root.to(stats.output.sum.device)
    out = stats.output
    outer = root @ out.outer @ root
    output = Moments(out.count.clone(), root @ out.sum, outer.trace(), outer)
    weight = whitened_weight(layer, metric)
    out_c, in_c = weight.shape[:2]
    per_position = weight.reshape(out_c, in_c, -1).permute(2, 0, 1)
    gram_input = (None if stats.weight_gram_input is None
                  else torch.einsum("koi,koj->ij", per_position, per_position))
    flat = weight.reshape(out_c, -1)
    return dataclasses.replace(stats, output=output, weight_gram_input=gram_input,
                               weight_gram_output=flat @ flat.T)


def whitened_weight(layer: nn.Module, metric: OutputMetric) -> torch.Tensor:
    """``R W`` in float64, ``W`` of shape ``(out, in, *kernel)`` (an embedding's table transposed,
    :meth:`rankwise.kinds.LayerKind.weight`)."""
    weight = kind_of(layer).weight(layer).detach().to(torch.float64)
    return torch.tensordot(metric.root.to(weight.device), weight, dims=([1], [0]))


def whitened_layer(layer: nn.Module, metric: OutputMetric) -> nn.Module:
    """A copy of the dense ``layer`` computing ``R y``: weight ``R W``, bias ``R b`` (none when the
    layer has none)."""
    whitened = copy.deepcopy(layer)
    dtype = layer.weight.dtype
    weight = whitened_weight(layer, metric)
    with torch.no_grad():
        whitened.weight.copy_(kind_of(layer).stored(weight).to(dtype))
        if getattr(layer, "bias", None) is not None:  # an embedding table has none
            whitened.bias.copy_((metric.root.to(layer.bias.device) @ layer.bias.detach().to(torch.float64)).to(dtype))
    return whitened


def unwhiten_output(projected: nn.Module, metric: OutputMetric) -> nn.Module:
    """``projected`` followed by ``R^-1``: its last layer's weight rows and bias mapped by ``R^-1``.

    ``projected`` is the projected form of a :func:`whitened_layer` (its last module, the
    output projection or the core, produces the whitened output channels). Modified in place
    and returned.
    """
    last = projected.out_proj if projected.out_proj is not None else projected.core
    kind = kind_of(last)
    inverse = metric.inverse_root.to(last.weight.device)
    with torch.no_grad():
        unwhitened = torch.tensordot(inverse, kind.weight(last).detach().to(torch.float64), dims=([1], [0]))
        last.weight.copy_(kind.stored(unwhitened).to(last.weight.dtype))
        if last.bias is not None:
            last.bias.copy_((inverse @ last.bias.detach().to(torch.float64)).to(last.bias.dtype))
    return projected


def batchnorm_metrics(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, OutputMetric]:
    """The metric ``diag(gamma / sigma)^2`` of each layer whose output feeds only a BatchNorm.

    A layer qualifies when its output goes to exactly one place, a ``BatchNorm1d/2d/3d`` with
    running statistics over the layer's output channels; its scale is
    ``gamma / sqrt(running_var + eps)`` (``gamma = 1`` without affine parameters). The graph is
    read with ``torch.fx``; a model that cannot be traced falls back to the order of the
    children of its ``nn.Sequential`` containers (a layer directly followed by a BatchNorm).

    Parameters
    ----------
    model : torch.nn.Module
    layers : dict of str to torch.nn.Module
        The analysed layers by qualified name.

    Returns
    -------
    dict of str to OutputMetric
        Only the layers followed by a BatchNorm.
    """
    return {name: OutputMetric.diagonal(batchnorm_scale(norm).detach().to(torch.float64))
            for name, norm in following_batchnorms(model, layers).items()}


def batchnorm_scale(norm: nn.Module) -> torch.Tensor:
    """``d = gamma / sqrt(running_var + eps)`` of an eval-mode BatchNorm (``gamma = 1`` without affine)."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    return scale * norm.weight if norm.affine else scale


def following_batchnorms(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``{layer name: the BatchNorm it alone feeds}`` (see :func:`batchnorm_metrics` for the rules):
    BatchNorms with running statistics over the layer's output channels."""
    pairs = _traced_pairs(model, layers)
    if pairs is None:
        pairs = _sequential_pairs(model, layers)
    return {name: norm for name, norm in pairs.items()
            if norm.running_var is not None and norm.num_features == kind_of(layers[name]).weight(layers[name]).shape[0]}


def only_batchnorm_user(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The qualified name of the BatchNorm module that is the only user of ``node``'s output in a
    ``torch.fx`` graph, or ``None`` (no such user, or other users too); ``modules`` is
    ``dict(model.named_modules())``."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and is_batchnorm(modules[users[0].target]):
        return users[0].target
    return None


def _traced_pairs(model: nn.Module, layers: dict) -> dict | None:
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure means: read the containers instead
        return None
    modules = dict(model.named_modules())
    calls: dict[str, list] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in layers:
            calls.setdefault(node.target, []).append(node)
    pairs = {}
    for name, nodes in calls.items():
        norm = only_batchnorm_user(nodes[0], modules) if len(nodes) == 1 else None
        if norm is not None:
            pairs[name] = modules[norm]
    return pairs


def _sequential_pairs(model: nn.Module, layers: dict) -> dict:
    pairs = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name, child), (_, following) in zip(children, children[1:]):
            qualified = f"{prefix}.{name}" if prefix else name
            if qualified in layers and is_batchnorm(following):
                pairs[qualified] = following
    return pairs
