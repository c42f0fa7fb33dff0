"""Tensor trains (matrix product states) of a kernel, by TT-SVD along a chosen leg order.

With the legs in the order ``l_1 .. l_d`` (e.g. ``"ihwo"``), a tensor train with bond ranks
``r_1 .. r_{d-1}`` is a chain of cores,

.. math:: W'[l_1, .., l_d] = \\sum_{t} G_1[l_1, t_1]\\, G_2[t_1, l_2, t_2] \\cdots G_d[t_{d-1}, l_d].

TT-SVD (Oseledets 2011) builds it left to right: reshape the remainder ``C`` (at first ``W``)
to ``(r_{k-1} n_k) x (\\text{rest})``, take its SVD ``U S V^T``, keep ``r_k`` columns of ``U`` as
core ``G_k`` and carry ``S V^T`` on. Every core but the last is left-orthonormal, so the
truncations' squared errors add up: ``|W - W'|^2 <= sum_k tail_k``. With every bond at its
largest rank (``min(prod_{j<=k} n_j, prod_{j>k} n_j)``) the train is exact.

How a chain runs as convolutions depends on where ``i`` and ``o`` sit in it (see
:mod:`rankwise.decompose.execution`):

- ``i`` and ``o`` at the two ends (``"ihwo"``, the default, or ``"iwho"``): four convolutions,
  ``1x1 (I -> r_1)``, ``kh x 1 (r_1 -> r_2)``, ``1 x kw (r_2 -> r_3)``, ``1x1 (r_3 -> O)``, the
  spatial ones carrying stride, padding and dilation along their own axis.
- a spatial leg outside the stretch between ``i`` and ``o`` (e.g. ``"hiwo"``, ``"ohiw"``) is a
  filter bank hanging off that stretch: it runs as a depthwise (then grouped) convolution on
  every channel at the point where it attaches, its filters stored once per channel.

With ``norm_retained = f`` each bond keeps the smallest rank whose tail energy is at most
``(1 - f^2) |W|^2 / (d - 1)``.
"""

from __future__ import annotations

import math

import torch

from rankwise.decompose.network import KernelNetwork, Node
from rankwise.decompose.selection import check_ranks, smallest_rank, tail_budget


def tt_check_ranks(sizes: dict, order: str, ranks) -> tuple[int, ...]:
    """The bond ranks, checked: ``1 <= r_k <= min(prod_{j<=k} n_j, prod_{j>k} n_j)``, and
    ``r_k <= r_{k-1} n_k`` (TT-SVD cannot give bond ``k`` more vectors than its matrix has rows).
    """
    dims = [sizes[leg] for leg in order]
    ranks = check_ranks(ranks, [(f"bond {k} of the train {order!r}",
                                 min(math.prod(dims[:k]), math.prod(dims[k:])))
                                for k in range(1, len(dims))])
    for k, (previous, rank) in enumerate(zip((1, *ranks), ranks), start=1):
        if rank > previous * dims[k - 1]:
            raise ValueError(f"ranks: bond {k} of the train {order!r} cannot exceed "
                             f"{previous * dims[k - 1]} (bond {k - 1} rank times leg {order[k - 1]!r}); "
                             f"got {tuple(ranks)!r}.")
    return ranks


def tt_network(kernel: torch.Tensor, legs: str, order: str, ranks=None,
               norm_retained: float | None = None) -> KernelNetwork:
    """TT-SVD of ``kernel`` along ``order``.

    Parameters
    ----------
    kernel : torch.Tensor
        float64, axes in the order of ``legs``.
    legs : str
        ``"oihw"`` or ``"oiw"``.
    order : str
        The chain, every leg once (e.g. ``"ihwo"``).
    ranks : tuple of int, optional
        One rank per bond (checked by :func:`tt_check_ranks`).
    norm_retained : float, optional
        Choose each bond's rank from its singular values instead.

    Returns
    -------
    KernelNetwork
        Cores ``G_k[t_{k-1}, l_k, t_k]`` (bonds named ``t1``, ``t2``, ...).
    """
    dims = [kernel.shape[legs.index(leg)] for leg in order]
    budget = None if ranks is not None else tail_budget(norm_retained, float(kernel.square().sum()),
                                                        len(order) - 1)
    remainder = kernel.permute([legs.index(leg) for leg in order])
    nodes, previous = [], 1
    for k, (leg, dim) in enumerate(zip(order[:-1], dims)):
        u, s, vh = torch.linalg.svd(remainder.reshape(previous * dim, -1), full_matrices=False)
        rank = ranks[k] if ranks is not None else smallest_rank(s, budget)
        core = u[:, :rank].reshape(previous, dim, rank)
        nodes.append(_node(core, k, leg, len(order)))
        remainder, previous = s[:rank, None] * vh[:rank], rank
    nodes.append(_node(remainder.reshape(previous, dims[-1], 1), len(order) - 1, order[-1], len(order)))
    return KernelNetwork(tuple(nodes), legs)


def _node(core: torch.Tensor, k: int, leg: str, length: int) -> Node:
    """Core ``k`` of a train of ``length`` without its dummy end bonds of length 1."""
    axes = (f"t{k}", leg, f"t{k + 1}")
    keep = [0 < k, True, k < length - 1]
    tensor = core.reshape([n for n, kept in zip(core.shape, keep) if kept])
    return Node(tensor, tuple(a for a, kept in zip(axes, keep) if kept))
