"""Ranks: from a target fraction of the kernel norm retained, and their valid ranges.

One convention everywhere: ``norm_retained = f`` asks for a truncated kernel ``W'`` with

.. math:: \\frac{\\|W - W'\\|}{\\|W\\|} \\le \\sqrt{1 - f^2},

Frobenius norms. For the truncations built on orthogonal projections (cuts, Tucker, tensor
trains) ``\\|W'\\|^2 + \\|W - W'\\|^2 = \\|W\\|^2``, so this is exactly ``\\|W'\\| \\ge f \\|W\\|``:
the fraction of the norm kept.

A truncated SVD at rank ``r`` loses the *tail energy* ``\\sum_{k > r} s_k^2``. A single cut
keeps the smallest ``r`` whose tail energy is at most ``(1 - f^2) \\|W\\|^2``. Decompositions
made of ``m`` truncations (Tucker over ``m`` modes, a tensor train with ``m`` bonds) give each
truncation the budget ``(1 - f^2) \\|W\\|^2 / m``: the squared errors of the truncations add up
to at most the total (HOSVD bound, and Oseledets' TT-SVD bound), so the target is met.
"""

from __future__ import annotations

import numbers

import torch


def tail_budget(norm_retained: float, kernel_energy: float, truncations: int) -> float:
    """Tail energy each of ``truncations`` truncations may lose: ``(1 - f^2) |W|^2 / m``."""
    return (1.0 - norm_retained ** 2) * kernel_energy / truncations


def smallest_rank(singular_values: torch.Tensor, max_tail_energy: float) -> int:
    """Smallest ``r >= 1`` with ``sum_{k > r} s_k^2 <= max_tail_energy`` (``s`` descending)."""
    energy = singular_values.to(torch.float64).square()
    tails = energy.flip(0).cumsum(0).flip(0)          # tails[k] = sum_{j >= k} s_j^2
    above = (tails > max_tail_energy * (1 + 1e-12)).nonzero()
    return max(1, int(above[-1]) + 1 if len(above) else 0)


def check_norm_retained(value) -> float:
    """``value`` as a float, or a ValueError unless it lies in ``(0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"norm_retained: expected a fraction in (0, 1] of the kernel norm to keep, "
                         f"got {value!r}.")
    return float(value)


def check_rank(value, bound: int, what: str) -> int:
    """``value`` as an int, or a ValueError (naming ``ranks`` and ``what``) unless ``1 <= value <= bound``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= bound:
        raise ValueError(f"ranks: {what} must be an integer from 1 to {bound}, got {value!r}.")
    return int(value)


def check_ranks(ranks, bounds: list[tuple[str, int]]) -> tuple[int, ...]:
    """``ranks`` (a tuple, one per entry of ``bounds = [(what, largest), ...]``) checked.

    Raises
    ------
    ValueError
        Naming ``ranks``, when the count is wrong or a rank is not an integer in range.
    """
    if len(ranks) != len(bounds):
        raise ValueError(f"ranks: expected {len(bounds)} rank(s) ({', '.join(w for w, _ in bounds)}), "
                         f"got {tuple(ranks)!r}.")
    return tuple(check_rank(rank, bound, what) for rank, (what, bound) in zip(ranks, bounds))
