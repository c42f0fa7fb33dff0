"""Tucker decompositions of a kernel over chosen legs (modes), fitted by HOOI.

Over modes ``m_1 .. m_k`` with ranks ``r_1 .. r_k``, Tucker writes

.. math:: W' = G \\times_{m_1} U_{m_1} \\cdots \\times_{m_k} U_{m_k}, \\qquad
          U_m \\in \\mathbb{R}^{n_m \\times r_m},\\ U_m^T U_m = I,

with a core ``G`` that keeps the legs not in the modes. ``W'`` is the orthogonal projection of
``W`` onto the span of the factors, so ``|W'|^2 + |W - W'|^2 = |W|^2``. The factors start from
the truncated HOSVD (leading left singular vectors of each unfolding ``W_(m)``) and are refined
by higher-order orthogonal iteration (tensorly's ``partial_tucker``), which never increases the
error. At ranks ``r_m = n_m`` the decomposition is exact.

- **Tucker-2** (``modes="oi"``, the default): ``1x1 (I -> r_i)``, the core as a ``k x k``
  convolution ``r_i -> r_o`` with the layer's stride, padding and dilation, ``1x1 (r_o -> O)``.
- **Full Tucker** (``modes="oihw"``): the spatial factors ``U_h``, ``U_w`` become per-channel
  filter banks (a depthwise ``kh x 1`` convolution ``r_i -> r_i r_h``, then a grouped
  ``1 x kw`` one ``-> r_i r_h r_w``), and the core a ``1x1`` convolution ``r_i r_h r_w -> r_o``.
  It saves work only when ``r_h r_w`` is well below ``kh kw``.

With ``norm_retained = f`` each mode's rank is the smallest whose HOSVD tail energy is at most
``(1 - f^2) |W|^2 / k`` (see :mod:`rankwise.decompose.selection`).
"""

from __future__ import annotations

import warnings

import torch

from rankwise.decompose.backend import tensorly
from rankwise.decompose.network import KernelNetwork, Node
from rankwise.decompose.selection import check_ranks, smallest_rank, tail_budget

TENSORLY_SVD_CLAMP = "Trying to compute SVD with n_eigenvecs"
"""tensorly warns when a rank exceeds an unfolding's rank; it then completes the factor."""
HOOI_ITERATIONS = 50
HOOI_TOLERANCE = 1e-8


def tucker_check_ranks(sizes: dict, modes: str, ranks) -> tuple[int, ...]:
    """One rank per mode, checked: the rank of mode ``m`` ranges over ``1 .. n_m``."""
    return check_ranks(ranks, [(f"the Tucker rank of leg {mode!r}", sizes[mode]) for mode in modes])


def tucker_network(kernel: torch.Tensor, legs: str, modes: str, ranks=None,
                   norm_retained: float | None = None) -> KernelNetwork:
    """Tucker decomposition of ``kernel`` over ``modes``.

    Parameters
    ----------
    kernel : torch.Tensor
        float64, axes in the order of ``legs``.
    legs : str
        ``"oihw"`` or ``"oiw"``.
    modes : str
        The legs compressed, e.g. ``"oi"``.
    ranks : tuple of int, optional
        One rank per mode, in the order of ``modes``.
    norm_retained : float, optional
        Choose the ranks from the HOSVD spectra instead (see the module docstring).

    Returns
    -------
    KernelNetwork
        One factor ``U[leg, b<leg>]`` per mode, in the order of ``modes``, then the core
        (bonds ``b<leg>`` in place of the modes' legs).
    """
    if ranks is None:
        ranks = _ranks_for_norm(kernel, legs, modes, norm_retained)
    tl = tensorly()
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TENSORLY_SVD_CLAMP)  # rank > a leg: expected
        (core, factors), _ = tl.decomposition.partial_tucker(
            kernel, rank=list(ranks), modes=[legs.index(m) for m in modes], init="svd",
            n_iter_max=HOOI_ITERATIONS, tol=HOOI_TOLERANCE)
    core_axes = tuple("b" + leg if leg in modes else leg for leg in legs)
    factor_nodes = (Node(factor, (mode, "b" + mode)) for mode, factor in zip(modes, factors))
    return KernelNetwork((*factor_nodes, Node(core, core_axes)), legs)


def _ranks_for_norm(kernel: torch.Tensor, legs: str, modes: str, norm_retained: float) -> tuple[int, ...]:
    budget = tail_budget(norm_retained, float(kernel.square().sum()), len(modes))
    return tuple(smallest_rank(torch.linalg.svdvals(_unfold(kernel, legs.index(mode))), budget)
                 for mode in modes)


def _unfold(kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """The mode-``axis`` unfolding ``W_(m)``: that axis as rows, all others as columns."""
    return kernel.movedim(axis, 0).reshape(kernel.shape[axis], -1)
