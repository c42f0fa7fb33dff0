"""The dense eigensolvers behind every spectrum: in the precision the data allow, on the threads
the machine has free (:mod:`rankwise.threads`).

**Precision.** A covariance ``C`` (``d x d``, positive semi-definite) estimated from ``n`` rows
is itself uncertain: its entries carry a sampling error of order ``|C|_2 sqrt(d / n)``. A
backward-stable eigensolver in a precision of unit roundoff ``u`` returns the exact
eigen-decomposition of ``C + E`` with ``|E|_2 <= c d u |C|_2`` (``c`` a small constant; rounding
``C`` to that precision adds ``u |C|`` entrywise, included in it). So the float32 solver
(``u = 2^-24``) is used when its error is at most a hundredth of the sampling error,

    d 2^-24 <= sqrt(d / n) / 100        and        d >= FLOAT32_FROM_WIDTH,

(``n <= 2.8e10 / d`` rows: every calibration set short of billions of tokens), and float64
otherwise; below :data:`FLOAT32_FROM_WIDTH` the float64 solver costs little and keeps small
layers exact at full rank to float64 rounding.

**The bound.** With ``delta = d 2^-24 |C|_2`` (``c = 1``; tested in ``tests/test_solvers.py``):

- every eigenvalue is within ``delta`` of float64's: ``|lambda^_j - lambda_j| <= delta``;
- the variance the float32 basis keeps at rank ``r`` is within ``3 r delta`` of the best
  (``r delta`` from the eigenvalues of ``C + E``, ``r delta`` from ``E`` itself, ``r delta`` from the
  basis' loss of orthogonality), so a residual fraction ``res(r)`` moves by at most
  ``3 r delta / tr C``.

A decision (a rank, an allocation) can therefore differ from float64's only between options
whose errors differ by less than that bound, far below the sampling error of the statistics.
"""

from __future__ import annotations

import math

import torch

from rankwise.threads import solving

FLOAT32_FROM_WIDTH = 256
"""Narrower matrices are always solved in float64 (the float32 solver saves little there)."""

ROUNDOFF32 = 2.0 ** -24
"""Unit roundoff of float32."""


def solver_dtype(width: int, count: float) -> torch.dtype:
    """The precision a ``width x width`` covariance of ``count`` rows is solved in (module docstring)."""
    if width < FLOAT32_FROM_WIDTH or count <= 0:
        return torch.float64
    return torch.float32 if width * ROUNDOFF32 <= math.sqrt(width / count) / 100 else torch.float64


def eigen_bound(matrix: torch.Tensor) -> float:
    """``delta = d 2^-24 |C|_2``: how far a float32 eigenvalue of the symmetric ``matrix`` may be from
    its float64 value (module docstring)."""
    return len(matrix) * ROUNDOFF32 * float(torch.linalg.matrix_norm(matrix, ord=2))


def descending_eigh(matrix: torch.Tensor, dtype: torch.dtype = torch.float64):
    """``(values, vectors)`` of the symmetric ``matrix``, largest first, solved in ``dtype`` and
    returned in float64 (negative round-off clamped to 0).

    Parameters
    ----------
    matrix : torch.Tensor
        ``(d, d)`` symmetric positive semi-definite.
    dtype : torch.dtype
        The solver's precision (:func:`solver_dtype`).
    """
    with solving():
        values, vectors = torch.linalg.eigh(matrix.to(dtype))
    return (values.flip(0).to(torch.float64).clamp_min(0),
            vectors.flip(1).to(torch.float64))


def thin_left_singular(factor: torch.Tensor, dtype: torch.dtype = torch.float64):
    """``(values, vectors)`` of ``B B^T`` for a tall ``(m, k)`` ``factor`` ``B`` (``k <= m``), without
    forming it: ``B = U S V^T`` (thin SVD) gives the eigenvalues ``S^2`` (padded with ``m - k``
    zeros: ``B B^T`` has rank at most ``k``) and the ``k`` eigenvectors ``U`` that can carry
    variance, in ``O(m k^2)`` instead of ``eigh``'s ``O(m^3)``. Solved in ``dtype``, returned in float64.

    The bound of the module docstring holds with ``2 delta`` for the eigenvalues (a singular
    value within ``d u |B|_2`` of its own, squared).
    """
    with solving():
        vectors, singular, _ = torch.linalg.svd(factor.to(dtype), full_matrices=False)
    values = torch.zeros(len(factor), dtype=torch.float64, device=factor.device)
    values[:len(singular)] = singular.to(torch.float64).square()
    return values, vectors.to(torch.float64)
