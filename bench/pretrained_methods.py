"""Prototype compression methods of issue 16 (bench only; written to be ported into rankwise).

Every method replaces a factorable layer ``y = W x + b`` (``Linear``; ungrouped ``Conv2d`` with
``W`` matricised to ``(out, in * kh * kw)`` and ``x`` the unfolded patch) by a rank-``r``
product ``y ~ B (A x) + c`` (two layers, see :func:`svd_baseline.factored_pair`).

**Weighted whitened SVD (one layer).** With ``mu, Sigma`` the mean and covariance of the layer's
input over the calibration samples (and spatial positions), and a diagonal output metric
``Omega = diag(w)``, the rank-``r`` ``W_r`` minimising ``E ||Omega^(1/2) (W x - W_r x - delta)||^2``
over ``W_r`` and a bias shift ``delta`` is obtained from the SVD ``Omega^(1/2) W L = U S V^T`` with
``L L^T = Sigma`` (Cholesky): ``W_r = Omega^(-1/2) U_r S_r V_r^T L^(-1)``, ``c = b + (W - W_r) mu``,
and the error it adds is exactly ``sum_(i>r) s_i^2`` (Eckart-Young in the whitened space). With
``w = 1`` this is SVD-LLM's whitened SVD, and it equals output-side PCA of the layer
(``U_r U_r^T W``: the left singular vectors of ``W Sigma^(1/2)`` are the principal directions of
``y``). Metrics ``w``: ``1`` (absolute output error), ``d^2`` with ``d`` the scale of the
eval-mode BatchNorm that follows (the error after BN: the exact analysis of the folded layer),
or the diagonal Fisher ``w_c = E[sum_p g_(c,p)^2]`` of the gradient ``g`` of ``-log p(y|x)`` with
``y`` sampled from the model (a Gaussian probe ``z^T f(x)`` for an embedding network), which
makes ``sum s_i^2`` a second-order estimate of twice the loss (KL) added.

**Shrinkage toward the data-free SVD.** ``Sigma`` is replaced by
``(1 - alpha) Sigma + alpha (tr Sigma / n) I``: ``alpha = 1`` is the plain SVD of ``Omega^(1/2) W``;
directions the calibration data never showed keep the weight of an average direction.

**Allocation.** ``uniform``: the same fraction of each layer's full rank everywhere (bisection
on the fraction to meet the budget). ``global``: greedy over all layers, each step the one
lowering the rank of one layer that adds the least estimated error per learnable removed
(errors in the metric's absolute units, comparable across layers when the metric is the
Fisher or the post-BN space). ``relative``: the same greedy with each layer's error divided by
its total ``sum_i s_i^2`` (the sum of per-layer residual fractions: greedy output PCA).

**Sequential correction.** Layers are compressed in network order; the compressed network's
input ``x~`` to the layer replaces ``x``: with the cross covariance ``C = Cov(x, x~)`` and
``Sigma~ = Cov(x~)``, ``W^ = (W C + lambda W)(Sigma~ + lambda I)^(-1)`` minimises
``E||W x - W' x~||^2 + lambda ||W' - W||_F^2`` (``lambda = alpha tr(Sigma~)/n``), and the rank-``r``
factor is the weighted whitened SVD of ``W^`` with ``Sigma~ + lambda I`` in place of ``Sigma``,
``c = b + W mu - W_r mu~``. Errors made upstream are then corrected downstream instead of
compounding.
"""

import copy
import heapq

import torch
import torch.nn.functional as F
from torch import nn

from svd_baseline import dense_learnables, factored_learnables, factored_pair, is_factorable, layer_sizes


def factorable_layers(model, skip=()):
    """``{name: layer}`` of the layers the methods factor, in network order."""
    return {name: m for name, m in model.named_modules() if is_factorable(m) and name not in skip}


def layer_inputs(layer, inputs):
    """The layer's input as rows ``(samples * positions, n)``: unfolded patches for a conv."""
    if isinstance(layer, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1])
    patches = F.unfold(inputs, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                       stride=layer.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


class Moments:
    """Running sums giving the mean and (cross) covariance of one or two row streams (float64)."""

    def __init__(self):
        self.count, self.sum_a, self.sum_b, self.sum_ab, self.sum_bb = 0, 0.0, 0.0, 0.0, 0.0

    def add(self, rows_a, rows_b=None):
        rows_a = rows_a.double()
        rows_b = rows_a if rows_b is None else rows_b.double()
        self.count += rows_a.shape[0]
        self.sum_a = self.sum_a + rows_a.sum(0)
        self.sum_b = self.sum_b + rows_b.sum(0)
        self.sum_ab = self.sum_ab + rows_a.T @ rows_b
        self.sum_bb = self.sum_bb + rows_b.T @ rows_b

    def means(self):
        return self.sum_a / self.count, self.sum_b / self.count

    def cross_covariance(self):
        mean_a, mean_b = self.means()
        return self.sum_ab / self.count - torch.outer(mean_a, mean_b)

    def covariance_b(self):
        _, mean_b = self.means()
        return self.sum_bb / self.count - torch.outer(mean_b, mean_b)


def feed_inputs(model, layers, batches, run, sink):
    """Run `batches` (``run(model, batch)`` calls the model) with ``sink(name, module, input)``
    called on each layer's input, without gradients."""
    hooks = [layer.register_forward_pre_hook(lambda module, args, name=name: sink(name, module, args[0]))
             for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                run(model, batch)
    finally:
        for hook in hooks:
            hook.remove()


def input_moments(model, layers, batches, run):
    """``{name: Moments}`` of each layer's input over `batches` (``run(model, batch)`` calls the model)."""
    moments = {name: Moments() for name in layers}
    feed_inputs(model, layers, batches, run, lambda name, module, inputs: moments[name].add(layer_inputs(module, inputs)))
    return moments


def fisher_diagonals(model, layers, batches, run, probe):
    """``{name: w}`` with ``w_c = mean over samples of sum_positions g_c^2``, ``g`` the gradient of
    ``probe(output)`` (a sampled log-likelihood) with respect to the layer's output channel ``c``.
    One backward pass per batch."""
    sums = {name: 0.0 for name in layers}
    samples = 0

    def keep_gradient(name, output):
        channel_dim = -1 if output.dim() == 2 or name_is_linear[name] else 1
        output.register_hook(lambda grad: sums.__setitem__(
            name, sums[name] + grad.double().pow(2).movedim(channel_dim, -1).reshape(-1, grad.shape[channel_dim]).sum(0)))

    name_is_linear = {name: isinstance(layer, nn.Linear) for name, layer in layers.items()}
    hooks = [layer.register_forward_hook(lambda module, args, output, name=name: keep_gradient(name, output))
             for name, layer in layers.items()]
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            output = run(model, batch)
            probe(output).backward()
            samples += output.shape[0]
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
    return {name: total / samples for name, total in sums.items()}


def shrunk(covariance, alpha):
    """``(1 - alpha) Sigma + alpha (tr Sigma / n) I`` plus a 1e-8 relative ridge for the Cholesky."""
    n = covariance.shape[0]
    level = torch.trace(covariance).clamp(min=1e-30) / n
    eye = torch.eye(n, dtype=covariance.dtype)
    return (1 - alpha) * covariance + (alpha + 1e-8) * level * eye


def whitened_svd(weight, covariance, metric):
    """``(U, s, V^T, L, m)``: the SVD of ``diag(m) W L`` with ``L L^T = covariance``, ``m = metric^(1/2)``."""
    root = metric.clamp(min=1e-30).sqrt()
    chol = torch.linalg.cholesky(covariance)
    u, s, vh = torch.linalg.svd(root[:, None] * weight @ chol, full_matrices=False)
    return u, s, vh, chol, root


class LayerPlan:
    """One layer's weighted whitened SVD, from which any rank's factors and error are read."""

    def __init__(self, layer, weight, input_mean, covariance, metric):
        self.layer, self.weight, self.input_mean = layer, weight, input_mean
        self.u, self.s, self.vh, self.chol, self.root = whitened_svd(weight, covariance, metric)

    def discarded(self, rank):
        """``sum_(i > rank) s_i^2``: the error the rank-`rank` factor adds, in the metric's units."""
        return float(self.s[rank:].pow(2).sum())

    def factors(self, rank, new_input_mean=None):
        """``(A, B, c)`` of the rank-`rank` factor, with the bias correction ``c = b + W mu - W_r mu~``."""
        first = torch.linalg.solve_triangular(self.chol.T, (self.s[:rank, None] * self.vh[:rank]).T,
                                              upper=True).T
        second = self.u[:, :rank] / self.root[:, None]
        bias = self.layer.bias.double() if self.layer.bias is not None else torch.zeros(self.weight.shape[0], dtype=torch.float64)
        mean = self.input_mean if new_input_mean is None else new_input_mean
        bias = bias + layer_matrix(self.layer) @ self.input_mean - second @ (first @ mean)
        return first, second, bias


def layer_matrix(layer):
    return layer.weight.detach().reshape(layer.weight.shape[0], -1).double()


def rank_options(layer):
    """``[(rank, learnables)]`` worth considering: every rank whose factored form is smaller, and
    the dense layer (rank ``None``)."""
    full = min(layer_sizes(layer))
    options = [(r, factored_learnables(layer, r)) for r in range(1, full + 1)
               if factored_learnables(layer, r) < dense_learnables(layer)]
    return options + [(None, dense_learnables(layer))]


def allocate_global(plans, target_removed, normalise=False):
    """Greedy ranks removing at least `target_removed` learnables at least estimated error.

    Each layer starts dense; a step moves one layer to its next smaller option, the step of
    least ``added error / learnables removed`` first (error divided by the layer's total
    ``sum s_i^2`` when `normalise`).
    """
    ranks, removed, heap = {}, 0, []
    options = {name: rank_options(plan.layer) for name, plan in plans.items()}
    scale = {name: (float(plan.s.pow(2).sum()) if normalise else 1.0) or 1.0 for name, plan in plans.items()}

    def error(name, rank):
        return 0.0 if rank is None else plans[name].discarded(rank) / scale[name]

    def push(name, index):
        if index == 0:
            return
        rank, learnables = options[name][index]
        next_rank, next_learnables = options[name][index - 1]
        cost = (error(name, next_rank) - error(name, rank)) / (learnables - next_learnables)
        heapq.heappush(heap, (cost, name, index - 1))

    position = {name: len(opts) - 1 for name, opts in options.items()}
    for name in plans:
        push(name, position[name])
    while removed < target_removed and heap:
        _, name, index = heapq.heappop(heap)
        removed += options[name][position[name]][1] - options[name][index][1]
        position[name] = index
        ranks[name] = options[name][index][0]
        push(name, index)
    return {name: rank for name, rank in ranks.items() if rank is not None}


def uniform_ranks(layers, fraction):
    """``{name: rank}`` at `fraction` of each full rank, for the layers where it is smaller."""
    ranks = {}
    for name, layer in layers.items():
        rank = max(1, round(fraction * min(layer_sizes(layer))))
        if factored_learnables(layer, rank) < dense_learnables(layer):
            ranks[name] = rank
    return ranks


def removed_by(layers, ranks):
    return sum(dense_learnables(layers[n]) - factored_learnables(layers[n], r) for n, r in ranks.items())


def allocate_uniform(layers, target_removed, iterations=40):
    """The smallest-error uniform fraction removing at least `target_removed` (bisection)."""
    low, high = 0.0, 1.0
    for _ in range(iterations):
        middle = (low + high) / 2
        if removed_by(layers, uniform_ranks(layers, middle)) >= target_removed:
            low = middle
        else:
            high = middle
    return uniform_ranks(layers, low)


def replace_layer(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def install(model, name, factors):
    """Replace layer `name` of `model` by the factored pair of `factors` ``(A, B, c)``."""
    layer = model.get_submodule(name)
    replace_layer(model, name, factored_pair(layer, *factors))


class _Captured(Exception):
    """Raised by a hook once it has the input it wanted: the rest of the forward is not needed."""


def stage_layer_order(model, stage, batch, names):
    """The names among `names` of the layers `stage(model, batch)` calls, in call order."""
    order = []
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda *_, n=n: order.append(n)) for n in names]
    try:
        with torch.no_grad():
            stage(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(order))


def captured_input(model, name, stage, batch):
    """The rows of layer `name`'s input when `stage(model, batch)` runs (stops there)."""
    layer = model.get_submodule(name)
    kept = []

    def capture(module, args):
        kept.append(layer_inputs(module, args[0]))
        raise _Captured

    hook = layer.register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            stage(model, batch)
    except _Captured:
        pass
    finally:
        hook.remove()
    return kept[0]


def corrected_plan(layer, moments, metric, alpha):
    """Weighted whitened SVD of the ridge regression ``W^ = (W C + lambda W)(Sigma~ + lambda I)^(-1)``."""
    weight = layer_matrix(layer)
    n = weight.shape[1]
    covariance = moments.covariance_b()
    ridge = (alpha + 1e-8) * torch.trace(covariance).clamp(min=1e-30) / n
    regularised = (1 - alpha) * covariance + ridge * torch.eye(n, dtype=torch.float64)
    target = weight @ ((1 - alpha) * moments.cross_covariance()) + ridge * weight
    fitted = torch.linalg.solve(regularised, target.T).T
    return LayerPlan(layer, fitted, moments.means()[0], regularised, metric)


def sequential_compress(model, stages, calibration, ranks, metric, alpha):
    """A copy of `model` whose layers in `ranks` are fitted, in network order, to the original
    layer's output given the compressed network's input (see the module docstring).

    `stages` are functions ``f(model, h)`` whose composition is the model's forward; the
    calibration batches are pushed through them stage by stage for both networks.
    """
    compressed = copy.deepcopy(model)
    original_states, compressed_states = list(calibration), list(calibration)
    for stage in stages:
        for name in stage_layer_order(model, stage, original_states[0], ranks):
            moments = Moments()
            for h_original, h_compressed in zip(original_states, compressed_states):
                moments.add(captured_input(model, name, stage, h_original),
                            captured_input(compressed, name, stage, h_compressed))
            plan = corrected_plan(model.get_submodule(name), moments, metric[name], alpha)
            install(compressed, name, plan.factors(ranks[name], new_input_mean=moments.means()[1]))
        with torch.no_grad():
            original_states = [stage(model, h) for h in original_states]
            compressed_states = [stage(compressed, h) for h in compressed_states]
    return compressed
