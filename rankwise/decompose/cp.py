"""CP (canonical polyadic) decomposition of a kernel, fitted by alternating least squares.

A rank-``R`` CP kernel is a sum of ``R`` outer products,

.. math:: W'[o, i, h, w] = \\sum_{r \\le R} A_o[o, r]\\, A_i[i, r]\\, A_h[h, r]\\, A_w[w, r],

fitted by ALS (tensorly's ``parafac``): each factor in turn is the exact least-squares solution
with the others fixed, until the relative error changes by less than ``ALS_TOLERANCE``.
ALS is started from a deterministic SVD initialisation (factor ``m`` = the leading left
singular vectors of the unfolding ``W_(m)``, completed by seeded random columns where ``R``
exceeds that leg's length) rather than from random factors, so repeated runs agree and the
start is already a good fit. The component weights are spread evenly over the factors
(``|lambda_r|^{1/d}`` each, the sign on ``A_o``), so that no factor's scale dominates
fine-tuning.

It runs as in Lebedev et al. (2015): ``1x1 (I -> R)``, a depthwise ``kh x 1`` and a depthwise
``1 x kw`` convolution on the ``R`` channels (carrying stride, padding and dilation), and
``1x1 (R -> O)`` with the bias; ``R (I + kh + kw + O)`` learnables.

CP is not an orthogonal projection: it is not exact at any fixed rank in general and its
error need not fall monotonically with ``R``. With ``norm_retained = f`` the rank is found by
bisection over ``1 .. R_max`` for the smallest fitted ``R`` whose relative norm loss is at most
``sqrt(1 - f^2)``, with ``R_max = prod(n) / max(n)`` (an upper bound on the rank of any tensor
of that shape); if even ``R_max`` misses the target, that fit is returned.
"""

from __future__ import annotations

import math
import warnings

import torch

from rankwise.decompose.backend import tensorly
from rankwise.decompose.network import KernelNetwork, Node
from rankwise.decompose.selection import check_ranks

TENSORLY_SVD_CLAMP = "Trying to compute SVD with n_eigenvecs"
"""tensorly warns when a rank exceeds an unfolding's rank; it then completes the factor."""
ALS_ITERATIONS = 200
ALS_TOLERANCE = 1e-7
SEED = 0


def cp_check_ranks(sizes: dict, legs: str, ranks) -> tuple[int, ...]:
    """``ranks = (R,)`` checked: ``1 <= R <= R_max``."""
    return check_ranks(ranks, [("the CP rank", largest_cp_rank([sizes[leg] for leg in legs]))])


def largest_cp_rank(dims) -> int:
    """``R_max = prod(n) / max(n)``: no tensor of shape ``n`` has a larger CP rank."""
    return math.prod(dims) // max(dims)


def cp_network(kernel: torch.Tensor, legs: str, ranks=None,
               norm_retained: float | None = None) -> KernelNetwork:
    """CP decomposition of ``kernel`` at rank ``ranks[0]`` or the smallest meeting ``norm_retained``.

    Parameters
    ----------
    kernel : torch.Tensor
        float64, axes in the order of ``legs``.
    legs : str
        ``"oihw"`` or ``"oiw"``.
    ranks : tuple of one int, optional
    norm_retained : float, optional

    Returns
    -------
    KernelNetwork
        One node ``A_leg[leg, r]`` per leg, all sharing the hyperedge ``r``.
    """
    if ranks is not None:
        return _fit(kernel, legs, ranks[0])
    return _smallest_fit(kernel, legs, math.sqrt(1.0 - norm_retained ** 2))


def _fit(kernel: torch.Tensor, legs: str, rank: int) -> KernelNetwork:
    tl = tensorly()
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TENSORLY_SVD_CLAMP)  # rank > a leg: expected
        weights, factors = tl.decomposition.parafac(
            kernel, rank, init="svd", n_iter_max=ALS_ITERATIONS, tol=ALS_TOLERANCE,
            normalize_factors=True, random_state=SEED)
    share = weights.abs().pow(1.0 / len(legs))
    scaled = [factor * share for factor in factors]
    scaled[legs.index("o")] = scaled[legs.index("o")] * weights.sign()
    return KernelNetwork(tuple(Node(factor, (leg, "r")) for leg, factor in zip(legs, scaled)), legs)


def _smallest_fit(kernel: torch.Tensor, legs: str, max_loss: float) -> KernelNetwork:
    """Bisection over the rank for the smallest fit with relative loss at most ``max_loss``."""
    fits = {}

    def fit(rank: int) -> KernelNetwork:
        if rank not in fits:
            fits[rank] = _fit(kernel, legs, rank)
        return fits[rank]

    norm = kernel.norm()
    low, high = 1, largest_cp_rank(kernel.shape)
    while low < high:
        middle = (low + high) // 2
        if (kernel - fit(middle).contract()).norm() <= max_loss * norm:
            high = middle
        else:
            low = middle + 1
    return fit(low)
