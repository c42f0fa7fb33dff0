"""Low-rank baselines of the transformer benchmarks, each written from its paper's mathematics.

Every method replaces a layer ``y = W x + b`` (``W`` of shape ``(out, in)``: an ``nn.Linear``'s
weight; the transpose of a GPT-2 ``Conv1D``'s ``(in, out)`` weight; for an ``nn.Embedding``,
the transposed table acting on one-hot tokens) by the rank-``r`` product ``y ~ B (A x) + b``,
``B`` of shape ``(out, r)`` and ``A`` of shape ``(r, in)``. All three are the same computation
with a different input weighting ``M`` (lower triangular, invertible):

    W M = U Sigma V^T  (SVD),    B = U_r,    A = Sigma_r V_r^T M^(-1),

so ``W' = U_r Sigma_r V_r^T M^(-1)``, the best rank-``r`` approximation of ``W`` in the norm
``||(W - W') M||_F`` (Eckart-Young in the weighted space):

- **plain SVD**: ``M = I``, the data-free truncated SVD of ``W`` (Eckart-Young-Mirsky; the
  baseline of both papers below).
- **ASVD** (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition for
  Compressing Large Language Models", arXiv:2312.05821): ``M = S = diag(mean_n |x_(n,j)|)^alpha``
  over the calibration rows, ``alpha = 0.5`` (the paper's choice); ``W' = (U_r Sigma_r)(V_r^T
  S^(-1))``. Input channels that carry large activations weigh more. The paper also allocates
  ranks by a sensitivity search; here the rank ratio is uniform.
- **SVD-LLM** (Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition for
  Large Language Model Compression", arXiv:2403.07378): ``M = L`` with ``L L^T = X X^T`` (the
  Cholesky factor of the input Gram matrix, rows of the calibration inputs, uncentred as in
  the paper; ``X X^T + eps I`` with ``eps = 1e-6 tr(X X^T) / in`` when it is not positive
  definite, the paper's remedy); then ``||(W - W') X||_F = ||(W M - (W M)_r)||_F``: the rank-``r``
  factor minimises the output error on the calibration data and the truncated singular
  values are exactly the loss (the paper's "truncation-aware" whitening).

For a token table, a token the calibration never saw has ``mean |x_j| = 0``; ASVD's ``S`` is
floored at ``1e-6 max(S)`` there (SVD-LLM's jitter does the same for ``L``). As ``S_j -> 0`` the
token's column of ``W'`` tends to ``U_r U_r^T W_(:, j)``, the projection of its embedding on
the kept subspace, so the floor gives a well-defined extension rather than a blow-up.

**Ranks.** One rank ratio for every layer (``r = round(f min(out, in))``), the largest ``f``
whose network removes at least the asked fraction of *all* learnables (bisection,
:func:`pretrained_methods.allocate_uniform`); a layer whose factored form would not be smaller
stays dense (:mod:`svd_baseline`).

**GPT-2.** ``transformers.pytorch_utils.Conv1D`` computes ``x @ weight + bias`` with ``weight``
of shape ``(in, out)``; :func:`with_linear_layers` replaces it by the ``nn.Linear`` with weight
``weight^T`` and the same bias: the same function (to float rounding) and the same learnables.

Statistics come from forward pre-hooks; batches must not hold padding (MiniLM is calibrated
one sentence per batch, GPT-2 on full windows). Plain torch: these are peers of rankwise.
"""

import copy

import torch
from torch import nn

import pretrained_methods as pm
from svd_baseline import factored_pair

ASVD_ALPHA = 0.5
JITTER = 1e-6


def is_conv1d(module):
    """True for ``transformers.pytorch_utils.Conv1D`` (without importing transformers)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@torch.no_grad()
def conv1d_as_linear(conv):
    """The ``nn.Linear`` computing the same ``x @ W + b`` as a GPT-2 ``Conv1D`` (``W`` is ``(in, out)``)."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    linear.weight.copy_(conv.weight.T)
    if conv.bias is not None:
        linear.bias.copy_(conv.bias)
    return linear


def with_linear_layers(model):
    """A copy of `model` with every GPT-2 ``Conv1D`` replaced by its exact ``nn.Linear``."""
    converted = copy.deepcopy(model)
    for name, module in list(converted.named_modules()):
        if is_conv1d(module):
            pm.replace_layer(converted, name, conv1d_as_linear(module))
    return converted


def weight_matrix(layer):
    """``W`` of ``y = W x``, ``(out, in)``, float64: a Linear's weight, a Conv1D's or an
    Embedding's transposed."""
    weight = layer.weight.detach().double()
    return weight.T if isinstance(layer, nn.Embedding) or is_conv1d(layer) else weight


def size_stand_in(layer):
    """A bias-free meta-device ``nn.Linear`` of an Embedding's shape, for the rank allocation."""
    if isinstance(layer, nn.Embedding):
        return nn.Linear(layer.num_embeddings, layer.embedding_dim, bias=False, device="meta")
    return layer


class InputStatistics:
    """Float64 running sums of one layer's input rows: count, ``sum |x|`` and the Gram ``sum x x^T``.

    An Embedding's input is one-hot tokens: ``sum |x|`` is the token counts and the Gram is
    their diagonal (kept as the vector of counts).
    """

    def __init__(self, layer):
        self.embedding = isinstance(layer, nn.Embedding)
        size = weight_matrix(layer).shape[1]
        self.count, self.abs_sum = 0, torch.zeros(size, dtype=torch.float64)
        self.gram = self.abs_sum.clone() if self.embedding else torch.zeros(size, size, dtype=torch.float64)

    def add(self, inputs):
        if self.embedding:
            counts = torch.bincount(inputs.reshape(-1), minlength=len(self.abs_sum)).double()
            self.count += int(counts.sum())
            self.abs_sum += counts
            self.gram += counts
            return
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).double()
        self.count += rows.shape[0]
        self.abs_sum += rows.abs().sum(0)
        self.gram += rows.T @ rows

    def mean_abs(self):
        return self.abs_sum / self.count

    def mean_gram(self):
        """``X X^T / N``: a matrix, or for an Embedding the vector of its diagonal."""
        return self.gram / self.count


def input_statistics(model, layer_names, batches, run):
    """``{name: InputStatistics}`` of the named layers of `model` over `batches` (``run(model, batch)``)."""
    layers = {name: model.get_submodule(name) for name in layer_names}
    statistics = {name: InputStatistics(layer) for name, layer in layers.items()}
    pm.feed_inputs(model, layers, batches, run, lambda name, module, inputs: statistics[name].add(inputs))
    return statistics


def asvd_weighting(statistics):
    """ASVD's ``S = diag(mean |x_j|)^alpha`` as the vector of its diagonal, floored at
    ``1e-6 max`` (see the module docstring)."""
    scale = statistics.mean_abs().pow(ASVD_ALPHA)
    return scale.clamp(min=JITTER * float(scale.max()))


def svd_llm_weighting(statistics):
    """SVD-LLM's Cholesky factor ``L`` of the input Gram, with the jitter where it is not PD.

    An Embedding's Gram is diagonal (token frequencies): ``L`` is the vector of their square roots.
    """
    gram = statistics.mean_gram()
    if statistics.embedding:
        return (gram + JITTER * float(gram.mean()) * bool((gram <= 0).any())).sqrt()
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        jitter = JITTER * float(torch.trace(gram)) / gram.shape[0]
        factor = torch.linalg.cholesky(gram + jitter * torch.eye(gram.shape[0], dtype=gram.dtype))
    return factor


WEIGHTINGS = {"svd": None, "asvd": asvd_weighting, "svd-llm": svd_llm_weighting}


class WeightedSVD:
    """The SVD of ``W M`` of one layer, from which the factors of any rank are read.

    ``M`` is ``None`` (the identity), a vector (a diagonal matrix) or a lower triangular matrix.
    """

    def __init__(self, layer, weighting):
        weight = weight_matrix(layer)
        self.weighting = weighting
        if weighting is not None:
            weight = weight * weighting if weighting.dim() == 1 else weight @ weighting
        self.u, self.s, self.vh = torch.linalg.svd(weight, full_matrices=False)

    def factors(self, rank):
        """``(A, B)``: ``A = Sigma_r V_r^T M^(-1)`` (a division or a triangular solve), ``B = U_r``."""
        scaled = self.s[:rank, None] * self.vh[:rank]
        if self.weighting is None:
            first = scaled
        elif self.weighting.dim() == 1:
            first = scaled / self.weighting
        else:
            first = torch.linalg.solve_triangular(self.weighting.T, scaled.T, upper=True).T
        return first, self.u[:, :rank]


@torch.no_grad()
def factored_module(layer, first, second):
    """The two-layer module ``x -> B (A x) + b`` standing for a Linear or an Embedding."""
    if not isinstance(layer, nn.Embedding):
        return factored_pair(layer, first, second)
    dtype, device = layer.weight.dtype, layer.weight.device
    table = nn.Embedding(layer.num_embeddings, first.shape[0], padding_idx=layer.padding_idx)
    table.weight.copy_(first.T.to(dtype))
    output = nn.Linear(first.shape[0], layer.embedding_dim, bias=False)
    output.weight.copy_(second.to(dtype))
    return nn.Sequential(table, output).to(device)


def decompositions(model, layer_names, method, statistics=None):
    """``{name: WeightedSVD}`` of `method` (``"svd"``, ``"asvd"`` or ``"svd-llm"``) for the layers."""
    weighting = WEIGHTINGS[method]
    return {name: WeightedSVD(model.get_submodule(name),
                              None if weighting is None else weighting(statistics[name]))
            for name in layer_names}


def compress(model, reduction, svds):
    """A copy of `model` (GPT-2 ``Conv1D`` as ``nn.Linear``) with one rank ratio everywhere.

    Parameters
    ----------
    model : torch.nn.Module
        Left unchanged.
    reduction : float
        Fraction of all of `model`'s learnables to remove (at least; see the module docstring).
    svds : dict of str to WeightedSVD
        From :func:`decompositions`, for the layers to factor.
    """
    compressed = with_linear_layers(model)
    layers = {name: compressed.get_submodule(name) for name in svds}
    total = sum(p.numel() for p in compressed.parameters())
    ranks = pm.allocate_uniform({n: size_stand_in(layer) for n, layer in layers.items()}, reduction * total)
    for name, rank in ranks.items():
        pm.replace_layer(compressed, name, factored_module(layers[name], *svds[name].factors(rank)))
    return compressed


def plain_svd(model, reduction, layer_names):
    """Truncated SVD of every named layer at one rank ratio removing `reduction` of all learnables."""
    return compress(model, reduction, decompositions(with_linear_layers(model), layer_names, "svd"))


def asvd(model, reduction, layer_names, statistics):
    """ASVD (activation-scaled SVD, ``alpha = 0.5``) of the named layers at one rank ratio."""
    return compress(model, reduction, decompositions(with_linear_layers(model), layer_names, "asvd", statistics))


def svd_llm(model, reduction, layer_names, statistics):
    """SVD-LLM (Cholesky-whitened SVD) of the named layers at one rank ratio."""
    return compress(model, reduction, decompositions(with_linear_layers(model), layer_names, "svd-llm", statistics))
