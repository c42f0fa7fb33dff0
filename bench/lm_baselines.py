"""Two more low-rank baselines for the causal-LM benchmark (issue 22), written from their papers'
mathematics, plus the assembly of every baseline's factors into rankwise's own layer form.

Every method replaces a Linear ``y = W x + b`` (``W``: ``(out, in)``) by ``y ~ B (A x) + b`` of
rank ``r`` (``B``: ``(out, r)``, ``A``: ``(r, in)``), as in :mod:`lowrank_baselines`.

- **SVD-LLM V2-style heterogeneous ratios** (Wang et al. 2025, "SVD-LLM V2: Optimizing Singular
  Value Truncation for Large Language Model Compression", arXiv:2503.12340, its heterogeneous
  compression ratio allocation). The factors are SVD-LLM's (whitened SVD,
  :func:`lowrank_baselines.svd_llm_weighting`: truncating the whitened ``W L`` at rank ``r``
  costs exactly ``||(W - W') X||_F = sqrt(sum_(i > r) s_i^2)``, the *theoretical truncation loss*;
  V2's two-round SVD reaches the same minimum without the Cholesky factor, so the factors are
  the same up to rounding). Only the ranks differ: the Linears are grouped by type (``q_proj``,
  ``k_proj``, ... of every decoder layer: one group per type, all of one shape ``m x n``). The
  uniform allocation of :func:`pretrained_methods.allocate_uniform` gives the group its
  parameter compression ratio ``R = 1 - r_u (m + n) / (m n)`` (``r_u`` the uniform rank); each
  matrix ``i`` of the group gets its theoretical loss at that rank over the calibration tokens
  (``N`` rows of ``X``: ``L_i = sqrt(N sum_(k > r_u) s_(i,k)^2)``, ``s`` the singular values of the
  whitened weight with the mean Gram ``X X^T / N``), and the ratio

      R_i = n_group R (1 / log L_i) / sum_j (1 / log L_j),

  so a matrix with a larger loss is compressed less and the group's mean ratio stays ``R``
  (the paper's rule; it needs every ``L_i > 1``, checked). Its rank is
  ``floor((1 - R_i) m n / (m + n))``, at least 1; a matrix whose factored form would not be
  smaller stays dense. The removed fraction is reported as measured (rounding moves it slightly).
- **KFAC-style both-sides factorization.** With the input second moment ``C = E[x x^T]`` (over
  the calibration tokens) and the output-gradient second moment ``G = E[g g^T]`` (``g`` the
  gradient of the language-model loss, the mean next-token cross-entropy of a chunk, with
  respect to the layer's output at each token, gathered by a hook on the output during a
  backward pass of each calibration chunk), the second-order change of the loss under
  ``W -> W'`` is approximated (Kronecker-factored Fisher, as in K-FAC, Martens and Grosse 2015)
  by ``||G^(1/2) (W - W') C^(1/2)||_F^2``, minimised at rank ``r`` by

      G^(1/2) W C^(1/2) = U S V^T,   B = G^(-1/2) U_r,   A = S_r V_r^T C^(-1/2).

  Both moments are damped before their square roots: ``M + delta (tr M / dim) I`` with
  ``delta`` = :data:`DAMPING` = 1e-3 (fixed beforehand, not tuned; a gradient moment of a few
  thousand tokens is ill-conditioned). At full rank ``B A = W`` exactly. One rank ratio for
  every layer (uniform, as :mod:`lowrank_baselines`).

The factored layers are :class:`rankwise.layers.linear.ProjectedLinear` with the output side
only (``core``: ``A`` without bias, ``out_proj``: ``B`` with ``b``): the same function as the
``nn.Sequential`` pair, but a compressed form rankwise knows, so ``rw.save`` / ``rw.load`` and
``rw.recover(..., method="lora")`` (healing the factors) apply to the baselines as to rankwise.
"""

import math
from collections import defaultdict

import torch
from torch import nn

import lowrank_baselines as lb
import pretrained_methods as pm
from rankwise.layers.linear import ProjectedLinear

DAMPING = 1e-3
METHODS = ("svd", "asvd", "svd-llm", "svd-llm-v2", "kfac")


class OutputGradientStatistics:
    """Float64 running ``count`` and ``sum g g^T`` of one layer's output gradients (rows ``g``)."""

    def __init__(self, size):
        self.count, self.gram = 0, torch.zeros(size, size, dtype=torch.float64)

    def add(self, gradient):
        rows = gradient.detach().reshape(-1, gradient.shape[-1]).double()
        self.count += rows.shape[0]
        self.gram += rows.T @ rows

    def mean_gram(self):
        return self.gram / self.count


def output_gradient_statistics(model, layer_names, batches):
    """``{name: OutputGradientStatistics}``: ``E[g g^T]`` of each named Linear's output gradient
    under the mean next-token cross-entropy of each batch (``{"input_ids": (1, T)}``)."""
    statistics = {name: OutputGradientStatistics(model.get_submodule(name).out_features) for name in layer_names}

    def on_output(name):
        def hook(module, args, output):
            output.register_hook(statistics[name].add)
        return hook

    hooks = [model.get_submodule(name).register_forward_hook(on_output(name)) for name in layer_names]
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(**batch, labels=batch["input_ids"], use_cache=False).loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
    return statistics


def damped_roots(moment):
    """``(M^(1/2), M^(-1/2))`` of ``M + DAMPING (tr M / dim) I`` (symmetric, by ``eigh``)."""
    size = moment.shape[0]
    damped = moment + DAMPING * float(torch.trace(moment)) / size * torch.eye(size, dtype=moment.dtype)
    values, vectors = torch.linalg.eigh(damped)
    values = values.clamp(min=float(values.max()) * 1e-12)
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T


class TwoSidedSVD:
    """The SVD of ``G^(1/2) W C^(1/2)`` of one layer, from which the factors of any rank are read."""

    def __init__(self, layer, input_moment, output_moment):
        left, self.left_inverse = damped_roots(output_moment)
        right, self.right_inverse = damped_roots(input_moment)
        self.u, self.s, self.vh = torch.linalg.svd(left @ lb.weight_matrix(layer) @ right, full_matrices=False)

    def factors(self, rank):
        """``(A, B)``: ``A = S_r V_r^T C^(-1/2)``, ``B = G^(-1/2) U_r``."""
        return (self.s[:rank, None] * self.vh[:rank]) @ self.right_inverse, self.left_inverse @ self.u[:, :rank]


def decompositions(model, layer_names, method, statistics=None, gradients=None):
    """``{name: decomposition with .factors(rank)}`` of `method` (one of :data:`METHODS`)."""
    if method == "kfac":
        return {name: TwoSidedSVD(model.get_submodule(name), statistics[name].mean_gram(),
                                  gradients[name].mean_gram()) for name in layer_names}
    return lb.decompositions(model, layer_names, "svd-llm" if method == "svd-llm-v2" else method, statistics)


def layer_type(name):
    """The group of a decoder Linear: its attribute name (``q_proj``, ``down_proj``, ...)."""
    return name.rsplit(".", 1)[-1]


def heterogeneous_ranks(layers, svds, uniform, tokens):
    """SVD-LLM V2's ranks (module docstring) from the uniform ranks `uniform` ``{name: rank}``.

    Parameters
    ----------
    layers : dict of str to nn.Linear
    svds : dict of str to lowrank_baselines.WeightedSVD
        SVD-LLM's whitened SVDs (mean Gram).
    uniform : dict of str to int
        The uniform allocation (layers absent stay dense).
    tokens : dict of str to int
        Calibration rows ``N`` of each layer's input.
    """
    groups, ranks = defaultdict(list), {}
    for name in layers:
        groups[layer_type(name)].append(name)
    for names in groups.values():
        out_size, in_size = lb.weight_matrix(layers[names[0]]).shape
        dense, width = out_size * in_size, out_size + in_size
        if {lb.weight_matrix(layers[n]).shape for n in names} != {(out_size, in_size)}:
            raise ValueError(f"the group {layer_type(names[0])} mixes shapes")
        kept = [uniform.get(n) for n in names]
        ratio = sum(0.0 if r is None else 1 - r * width / dense for r in kept) / len(names)
        if ratio <= 0:
            continue
        losses = [math.sqrt(tokens[n] * float(svds[n].s[r:].pow(2).sum())) for n, r in zip(names, kept)]
        if min(losses) <= 1:
            raise ValueError(f"a theoretical truncation loss <= 1 in group {layer_type(names[0])}: "
                             "the 1 / log L rule needs L > 1")
        scores = [1 / math.log(loss) for loss in losses]
        for name, score in zip(names, scores):
            share = len(names) * ratio * score / sum(scores)
            rank = min(max(1, math.floor((1 - share) * dense / width)), min(out_size, in_size))
            if rank * width < dense:
                ranks[name] = rank
    return ranks


@torch.no_grad()
def projected(layer, first, second):
    """The output-side :class:`ProjectedLinear` ``x -> B (A x) + b`` standing for `layer`."""
    dtype, device = layer.weight.dtype, layer.weight.device
    core = nn.Linear(first.shape[1], first.shape[0], bias=False, dtype=dtype, device=device)
    core.weight.copy_(first.to(dtype))
    out_proj = nn.Linear(second.shape[1], second.shape[0], bias=layer.bias is not None, dtype=dtype, device=device)
    out_proj.weight.copy_(second.to(dtype))
    if layer.bias is not None:
        out_proj.bias.copy_(layer.bias)
    return ProjectedLinear(None, core, out_proj)


def compress(model, reduction, svds, method, statistics=None):
    """A copy of `model` with the layers of `svds` factored: the uniform rank ratio removing at
    least `reduction` of all learnables, re-allocated per layer for ``"svd-llm-v2"``."""
    compressed = lb.with_linear_layers(model)
    layers = {name: compressed.get_submodule(name) for name in svds}
    total = sum(p.numel() for p in compressed.parameters())
    ranks = pm.allocate_uniform(layers, reduction * total)
    if method == "svd-llm-v2":
        ranks = heterogeneous_ranks(layers, svds, ranks, {n: statistics[n].count for n in svds})
    for name, rank in ranks.items():
        pm.replace_layer(compressed, name, projected(layers[name], *svds[name].factors(rank)))
    return compressed, ranks
