"""Streaming moments of activation rows and the principal components of their covariance.

The building blocks of :mod:`rankwise.statistics` (dense, LSTM and GRU layers):
:class:`Moments` accumulates, in
float64, what a covariance needs from rows seen batch by batch; :class:`Spectrum` holds the
eigen-decomposition of a (regularised) covariance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class NonFiniteActivationError(ValueError):
    """A layer produced NaN or Inf activations during calibration."""


@dataclass
class Moments:
    """Streaming moments of rows ``x_t`` in ``R^d``.

    ``count = n``, ``sum = sum_t x_t``, ``square_sum = sum_t |x_t|^2`` and, unless the side
    tracks only its power, ``outer = sum_t x_t x_t^T``; all float64 tensors, so that
    moments of disjoint data add up.
    """

    count: torch.Tensor
    sum: torch.Tensor
    square_sum: torch.Tensor
    outer: torch.Tensor | None

    @classmethod
    def zeros(cls, dim: int, device=None, outer: bool = True) -> "Moments":
        """Moments of no data in dimension ``dim``; ``outer=False`` tracks no ``outer``."""
        z = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros((), **z), torch.zeros(dim, **z), torch.zeros((), **z),
                   torch.zeros(dim, dim, **z) if outer else None)

    def update(self, rows: torch.Tensor) -> None:
        """Add the rows of a ``(m, d)`` tensor.

        The sums of one batch (its ``d x d`` product ``rows^T rows`` included) run in the
        rows' precision (at least float32) for speed; they are accumulated across batches in
        float64.

        Raises
        ------
        NonFiniteActivationError
            When the rows hold NaN or Inf.
        """
        compute = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
        batch_sum = compute.sum(0).to(torch.float64)
        if not torch.isfinite(batch_sum).all():
            raise NonFiniteActivationError("NaN or Inf values")
        self.count += rows.shape[0]
        self.sum += batch_sum
        if self.outer is None:
            self.square_sum += compute.square().sum().to(torch.float64)
        else:
            gram = (compute.T @ compute).to(torch.float64)
            self.outer += gram
            self.square_sum += gram.trace()

    def update_of(self, rows: torch.Tensor, layer: str, what: str) -> None:
        """:meth:`update`, whose NaN or Inf error names the ``layer`` and ``what`` the rows are."""
        try:
            self.update(rows)
        except NonFiniteActivationError:
            raise NonFiniteActivationError(f"layer {layer!r} has NaN or Inf in its {what}; check "
                                           "the data and the model's weights.") from None

    def tensors(self) -> list[torch.Tensor]:
        """``count``, ``sum``, ``square_sum`` and ``outer`` (when tracked): the sums over rows."""
        return [t for t in (self.count, self.sum, self.square_sum, self.outer) if t is not None]

    def __add__(self, other: "Moments") -> "Moments":
        outer = None if self.outer is None else self.outer + other.outer
        return Moments(self.count + other.count, self.sum + other.sum,
                       self.square_sum + other.square_sum, outer)

    def block(self, start: int, stop: int) -> "Moments":
        """The moments of the coordinates ``start:stop`` of the rows (a view of ``outer``)."""
        outer = self.outer[start:stop, start:stop]
        return Moments(self.count, self.sum[start:stop], outer.trace(), outer)

    @property
    def mean(self) -> torch.Tensor:
        """``mu = sum / count``."""
        return self.sum / self.count

    @property
    def power(self) -> torch.Tensor:
        """Mean variance per channel, ``tr(C) / d = (square_sum / n - |mu|^2) / d``."""
        return (self.square_sum / self.count - self.mean.square().sum()) / len(self.sum)

    @property
    def covariance(self) -> torch.Tensor:
        """Population covariance ``outer / n - mu mu^T``, symmetrised."""
        mu = self.mean
        return self.second_moment - torch.outer(mu, mu)

    @property
    def second_moment(self) -> torch.Tensor:
        """Uncentred second moment ``outer / n``, symmetrised."""
        if self.outer is None:
            raise ValueError("these moments track no outer products (the input side of a Linear "
                             "layer): only the output side has a covariance.")
        moment = self.outer / self.count
        return (moment + moment.T) / 2


@dataclass(frozen=True)
class Spectrum:
    """Principal components of one side of one layer.

    Attributes
    ----------
    eigenvalues : torch.Tensor
        ``(d,)`` float64, descending, of the regularised covariance.
    eigenvectors : torch.Tensor
        ``(d, d)`` float64, column ``j`` belongs to ``eigenvalues[j]``.
    mean : torch.Tensor
        ``(d,)`` float64 mean of the activations.
    regularization : float
        The shrinkage ``alpha`` used.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    mean: torch.Tensor
    regularization: float

    @classmethod
    def shrunk(cls, covariance: torch.Tensor, mean: torch.Tensor, alpha: float,
               prior: torch.Tensor) -> "Spectrum":
        """Eigen-decomposition of ``(1 - alpha) C + alpha prior`` (negative round-off clamped)."""
        if alpha > 0:
            covariance = (1 - alpha) * covariance + alpha * prior
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        return cls(eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1), mean, alpha)
