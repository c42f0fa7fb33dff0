"""The four truncation methods, side by side: what structure each takes and how it decomposes.

========  ===============  ============================  =========================================
method    structure        default                       ranks
========  ===============  ============================  =========================================
cut       ``cut=``         ``"o|ihw"`` (``"o|iw"``)      one: the rank of the cut
tucker    ``modes=``       ``"oi"`` (Tucker-2)           one per mode, in the order of ``modes``
cp        (none)           all legs                      one: the number of components
tt        ``order=``       ``"ihwo"`` (``"iwo"``)        one per bond, ``len(order) - 1``
========  ===============  ============================  =========================================

An integer ``ranks`` stands for that rank everywhere (every mode, every bond), clipped in each
layer to what its kernel allows (``Method.largest_ranks``); ranks given per layer are not clipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from rankwise.decompose.cp import cp_check_ranks, cp_network, largest_cp_rank
from rankwise.decompose.cuts import cut_check_ranks, cut_network
from rankwise.decompose.legs import default_order, parse_cut, parse_modes, parse_order
from rankwise.decompose.tt import tt_check_ranks, tt_network
from rankwise.decompose.tucker import tucker_check_ranks, tucker_network


@dataclass(frozen=True)
class Method:
    """How one method reads its structure and ranks and decomposes a kernel.

    Attributes
    ----------
    argument : str or None
        The keyword of :func:`rankwise.truncate_kernels` giving the structure (``None``: CP).
    default : callable
        ``default(legs) -> str``, the structure when the keyword is not given.
    parse : callable
        ``parse(value, legs) -> structure``, raising ValueError on a bad value.
    name_of : callable
        ``name_of(structure) -> str``, the structure written out for reports.
    rank_count : callable
        ``rank_count(structure) -> int``, how many ranks the method takes.
    check_ranks : callable
        ``check_ranks(sizes, structure, ranks) -> tuple``, raising ValueError when out of range.
    decompose : callable
        ``decompose(kernel, legs, structure, ranks=, norm_retained=) -> KernelNetwork``.
    largest_ranks : callable
        ``largest_ranks(sizes, structure) -> tuple``, the largest rank each position allows (an
        integer rank given for the whole network is clipped to these, layer by layer).
    """

    argument: str | None
    default: Callable
    parse: Callable
    name_of: Callable
    rank_count: Callable
    check_ranks: Callable
    decompose: Callable
    largest_ranks: Callable


METHODS = {
    "cut": Method("cut", lambda legs: "o|" + legs[1:], parse_cut, "|".join, lambda sides: 1,
                  cut_check_ranks, cut_network,
                  lambda sizes, sides: (min(math.prod(sizes[leg] for leg in side) for side in sides),)),
    "tucker": Method("modes", lambda legs: "oi", parse_modes, str, len, tucker_check_ranks,
                     tucker_network, lambda sizes, modes: tuple(sizes[mode] for mode in modes)),
    "cp": Method(None, lambda legs: legs, lambda value, legs: legs, str, lambda legs: 1,
                 cp_check_ranks,
                 lambda kernel, legs, structure, **truncation: cp_network(kernel, legs, **truncation),
                 lambda sizes, legs: (largest_cp_rank([sizes[leg] for leg in legs]),)),
    "tt": Method("order", default_order, parse_order, str, lambda order: len(order) - 1,
                 tt_check_ranks, tt_network,
                 lambda sizes, order: _train_bonds([sizes[leg] for leg in order])),
}


def _train_bonds(dims: list[int]) -> tuple[int, ...]:
    """Largest bond ranks of a train over legs of sizes ``dims``: ``min(prod_{j<=k} n_j, prod_{j>k} n_j)``.

    Clipping one rank ``r`` to these keeps ``r_k <= r_{k-1} n_k``, which TT-SVD needs.
    """
    return tuple(min(math.prod(dims[:k]), math.prod(dims[k:])) for k in range(1, len(dims)))
