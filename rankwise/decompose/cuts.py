"""Cuts: the kernel matricised along a bipartition of its legs and truncated by SVD.

For a cut ``L|R`` of the legs of ``W`` (``L`` holds ``o``), the matrix
``M[(l_1 .. l_p), (r_1 .. r_q)] = W`` has the SVD ``M = U S V^T``; keeping ``r`` singular
values gives the best rank-``r`` approximation (Eckart-Young) and two nodes joined by one
bond ``b`` of length ``r``,

.. math:: W'[L, R] = \\sum_{b \\le r} A[L, b]\\, B[b, R], \\qquad
          A = U_r S_r^{1/2}, \\quad B = S_r^{1/2} V_r^T,

with relative norm loss ``sqrt(sum_{k > r} s_k^2 / sum_k s_k^2)``. The largest useful rank is
``min(prod |L|, prod |R|)``, where the cut is exact.

How each cut runs (see :mod:`rankwise.decompose.execution`; ``k_S`` is the kernel over legs
``S``, stride, padding and dilation go with the conv that carries each spatial leg):

- ``i`` and ``o`` on different sides (``o|ihw``, ``oh|iw``, ``ow|ih``, ``ohw|i``): two dense
  convolutions, ``I -> r`` over the spatial legs on ``i``'s side then ``r -> O`` over those on
  ``o``'s side: ``o|ihw`` is ``k x k`` then ``1x1``, ``ohw|i`` is ``1x1`` then ``k x k``,
  ``oh|iw`` is ``1 x kw`` then ``kh x 1``, ``ow|ih`` is ``kh x 1`` then ``1 x kw``.
- ``i`` and ``o`` on the same side (``oi|hw``, ``oih|w``, ``oiw|h``): ``B`` is a bank of ``r``
  spatial filters shared by every input channel. It runs as a depthwise convolution
  ``I -> I r`` (each input channel filtered by the ``r`` filters; the bank is stored once per
  input channel, so it holds ``I r |k_R|`` learnables, and fine-tuning may untie the copies),
  then a dense convolution ``I r -> O`` over the spatial legs on ``A``'s side. This is the
  faithful standard-convolution form; it is cheap only for small ``r`` (at full rank
  ``r = |k_R|`` it costs more than the dense layer).
"""

from __future__ import annotations

import math

import torch

from rankwise.decompose.network import KernelNetwork, Node
from rankwise.decompose.selection import check_ranks, smallest_rank, tail_budget


def cut_check_ranks(sizes: dict, sides: tuple[str, str], ranks) -> tuple[int, ...]:
    """``ranks = (r,)`` checked: ``1 <= r <= min(prod |L|, prod |R|)``."""
    left, right = sides
    bound = min(math.prod(sizes[leg] for leg in left), math.prod(sizes[leg] for leg in right))
    return check_ranks(ranks, [(f"the rank of cut {left}|{right}", bound)])


def cut_network(kernel: torch.Tensor, legs: str, sides: tuple[str, str], ranks=None,
                norm_retained: float | None = None) -> KernelNetwork:
    """Truncated SVD of ``kernel`` along the cut ``sides = (L, R)``.

    Parameters
    ----------
    kernel : torch.Tensor
        float64, axes in the order of ``legs``.
    legs : str
        ``"oihw"`` or ``"oiw"``.
    sides : tuple of str
        The two sides of the cut (see :func:`rankwise.decompose.legs.parse_cut`).
    ranks : tuple of one int, optional
        The rank kept.
    norm_retained : float, optional
        Keep the smallest rank whose relative norm loss is at most ``sqrt(1 - f^2)``.

    Returns
    -------
    KernelNetwork
        Nodes ``A[L, b]`` and ``B[b, R]``.
    """
    left, right = sides
    matrix = _matricise(kernel, legs, left + right, len(left))
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = ranks[0] if ranks is not None else smallest_rank(s, tail_budget(norm_retained, float(s.square().sum()), 1))
    root = s[:rank].sqrt()
    shape = dict(zip(legs, kernel.shape))
    a = (u[:, :rank] * root).reshape(*(shape[leg] for leg in left), rank)
    b = (root[:, None] * vh[:rank]).reshape(rank, *(shape[leg] for leg in right))
    return KernelNetwork((Node(a, (*left, "b")), Node(b, ("b", *right))), legs)


def _matricise(kernel: torch.Tensor, legs: str, order: str, rows: int) -> torch.Tensor:
    """``kernel`` with its axes in ``order``, the first ``rows`` of them flattened into rows."""
    permuted = kernel.permute([legs.index(leg) for leg in order])
    return permuted.reshape(math.prod(permuted.shape[:rows]), -1)
