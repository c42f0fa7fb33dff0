"""Streaming moments of activation rows and the principal components of their covariance.

The building blocks of :mod:`rankwise.statistics` (dense, LSTM and GRU layers):
:class:`Moments` accumulates, in
float64, what a covariance needs from rows seen batch by batch; :class:`Spectrum` holds the
eigen-decomposition of a (regularised) covariance.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from rankwise.solvers import descending_eigh, solver_dtype, thin_left_singular


class NonFiniteActivationError(ValueError):
    """A layer produced NaN or Inf activations during calibration."""


@dataclass
class Moments:
    """Streaming moments of rows ``x_t`` in ``R^d``.

    ``count = n``, ``sum = sum_t x_t``, ``square_sum = sum_t |x_t|^2`` and, unless the side
    tracks only its power, ``outer = sum_t x_t x_t^T``; all float64 tensors, so that
    moments of disjoint data add up.

    **Precision.** The sums of one batch (:meth:`of_rows`, :meth:`of_channels`) run in the
    activations' precision, at least float32 (bfloat16 and float16 rows are upcast to float32,
    exactly, before the product), and are accumulated across batches in float64. In float32
    (unit roundoff ``u = 2^-24``) the Gram of a batch of ``m`` rows, the columns ``X_i`` of its
    ``(m, d)`` row matrix, is off entrywise by at most

        |fl(X_i^T X_j) - X_i^T X_j| <= gamma_m |X_i|^T |X_j| <= gamma_m |X_i| |X_j|,
        gamma_m = m u / (1 - m u),

    (the classical bound for a dot product of length ``m``; with rounding errors of random sign
    the error grows like ``sqrt(m) u |X_i| |X_j|`` instead, and blocked BLAS kernels stay below
    it). Adding the batches in float64 costs ``2^-53`` per addition, nothing in comparison, so
    over batches ``b`` the accumulated ``outer`` is within ``sum_b gamma_m_b |X_i^b| |X_j^b|``
    of the exact sum, a relative error of about ``sqrt(m) 2^-24`` (``6e-7`` for ``m = 1024``
    rows per batch) of the rows' norms. The covariance ``outer / n - mu mu^T`` loses, on top,
    the usual cancellation of a large mean: a channel whose mean is ``k`` times its standard
    deviation has its variance ``k^2`` times less accurate. float64 models get float64 products,
    and so do the rows of small calls gathered by a :class:`RowBuffer`.
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

    @classmethod
    def of_rows(cls, rows: torch.Tensor, outer: bool = True) -> "Moments":
        """The moments of the rows of one ``(m, d)`` batch (see the class docstring for the precision).

        Raises
        ------
        NonFiniteActivationError
            When the rows hold NaN or Inf.
        """
        compute = computable(rows)
        gram = _gram(compute) if outer else None
        return cls._of_batch(rows.shape[0], compute.sum(0), gram, compute)

    @classmethod
    def of_channels(cls, channels: torch.Tensor, outer: bool = True) -> "Moments":
        """The moments of the channel vectors ``x_{n, :, l}`` of an ``(N, C, L)`` batch (a
        convolution's activation, its spatial positions flattened), without moving the channels
        last: ``S = sum_n X_n X_n^T`` as one batched product when ``C <= L`` (its ``(N, C, C)``
        products are no larger than the activation), else as one product of the ``(C, N L)``
        matrix that swapping ``N`` and ``C`` copies out in contiguous blocks of ``L``.

        Raises
        ------
        NonFiniteActivationError
            When the activation holds NaN or Inf.
        """
        compute = computable(channels)
        num, dim, positions = compute.shape
        gram = None
        if outer and dim <= positions:
            gram = torch.bmm(compute, compute.transpose(1, 2)).sum(0)
        elif outer:
            flat = compute.transpose(0, 1).reshape(dim, -1)
            gram = flat @ flat.T
        return cls._of_batch(num * positions, compute.sum((0, 2)), gram, compute)

    @classmethod
    def _of_batch(cls, count: int, batch_sum, gram, compute) -> "Moments":
        """Float64 moments from one batch's sums computed in ``compute``'s precision."""
        batch_sum = finite_sum(batch_sum)
        if gram is None:
            square_sum = compute.square().sum().to(torch.float64)
        else:
            gram = gram.to(torch.float64)
            square_sum = gram.trace()
        return cls(torch.tensor(float(count), dtype=torch.float64, device=batch_sum.device),
                   batch_sum, square_sum, gram)

    def update(self, rows: torch.Tensor) -> None:
        """Add the rows of a ``(m, d)`` tensor (:meth:`of_rows`, accumulated in float64).

        Raises
        ------
        NonFiniteActivationError
            When the rows hold NaN or Inf.
        """
        self.add_(Moments.of_rows(rows, outer=self.outer is not None))

    def add_(self, batch: "Moments") -> None:
        """Add the moments of ``batch`` in place (``outer`` only when both track it)."""
        self.count += batch.count
        self.sum += batch.sum
        self.square_sum += batch.square_sum
        if self.outer is not None:
            self.outer += batch.outer

    def update_of(self, rows: torch.Tensor, layer: str, what: str) -> None:
        """:meth:`update`, whose NaN or Inf error names the ``layer`` and ``what`` the rows are."""
        with naming_layer(layer, what):
            self.update(rows)

    def tensors(self) -> list[torch.Tensor]:
        """``count``, ``sum``, ``square_sum`` and ``outer`` (when tracked): the sums over rows."""
        return [t for t in (self.count, self.sum, self.square_sum, self.outer) if t is not None]

    def __add__(self, other: "Moments") -> "Moments":
        """The moments of both data sets (``outer`` only when both track it)."""
        outer = None if self.outer is None or other.outer is None else self.outer + other.outer
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


@contextlib.contextmanager
def naming_layer(layer: str, what: str):
    """Context manager: a :class:`NonFiniteActivationError` inside it names the ``layer`` and
    ``what`` its rows are."""
    try:
        yield
    except NonFiniteActivationError:
        raise NonFiniteActivationError(f"layer {layer!r} has NaN or Inf in its {what}; check "
                                       "the data and the model's weights.") from None


BLOCKED_GRAM_WIDTH, BLOCKED_GRAM_ROWS = 128, 64
"""From this width and this many rows on, :func:`_gram` computes three of the four blocks of a
Gram (below, three small products cost more than one)."""


def _gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows^T rows`` of an ``(m, d)`` tensor, as float64 (products in the rows' precision).

    From :data:`BLOCKED_GRAM_WIDTH` columns and :data:`BLOCKED_GRAM_ROWS` rows on, it uses the
    symmetry: with ``rows = [A B]`` split in halves, ``[[A^T A, A^T B], [(A^T B)^T, B^T B]]``,
    three products instead of four (a quarter of the multiplications saved; the halves are
    strided views, nothing is copied).
    """
    count, width = rows.shape
    if width < BLOCKED_GRAM_WIDTH or count < BLOCKED_GRAM_ROWS:
        return (rows.T @ rows).to(torch.float64)
    half = width // 2
    left, right = rows[:, :half], rows[:, half:]
    gram = torch.empty(width, width, dtype=torch.float64, device=rows.device)
    gram[:half, :half] = left.T @ left
    cross = left.T @ right
    gram[:half, half:] = cross
    gram[half:, :half] = cross.T
    gram[half:, half:] = right.T @ right
    return gram


def finite_sum(batch_sum: torch.Tensor) -> torch.Tensor:
    """``batch_sum`` (a batch's column sums) in float64.

    Raises
    ------
    NonFiniteActivationError
        When it holds NaN or Inf (so did the batch: a NaN or Inf entry makes its column's sum one).
    """
    batch_sum = batch_sum.to(torch.float64)
    if not torch.isfinite(batch_sum).all():
        raise NonFiniteActivationError("NaN or Inf values")
    return batch_sum


ROWS_PER_PRODUCT = 256
"""Rows of one product of a :class:`RowBuffer`: calls of fewer rows are gathered up to it. A
product's fixed cost (its addition to each target's ``outer``, ``d^2``, and a few calls' worth
of dispatch) is then at most ``1 / 256`` of its ``m d^2`` multiply-adds, and its GEMM is as
efficient as a larger one's; the buffer, ``256 d`` doubles, is no larger than an ``outer``
(``d^2`` doubles) from ``d = 256`` on, which a width-scaled buffer (``max(256, d)`` rows) would
not be. Calls of at least this many rows (padded batches, convolutions) are products of their own."""


BUFFERED_WIDTH = 128
"""Rows narrower than this are not buffered: what buffering saves per call, the ``d^2`` float64
conversion and addition of the call's Gram, is then below the few microseconds of dispatch it
adds (a copy of the rows, its bookkeeping); such calls keep their float32 product per batch."""


class RowBuffer:
    """Rows of calls too small for a product of their own, gathered into one Gram for ``targets``.

    The Gram of ``m`` rows costs ``m d^2`` multiply-adds, and its conversion to float64 and its
    addition to an ``outer`` ``3 d^2`` more, whatever ``m``: a call of ten rows (one sentence
    through a transformer) pays mostly the latter. :meth:`append` copies each call's rows into a
    float64 ``(ROWS_PER_PRODUCT, d)`` buffer and multiplies it when the next call would overflow
    it (and at :meth:`flush`), adding ``G = sum_t x_t x_t^T`` to the ``outer`` and ``tr G`` to
    the ``square_sum`` of every target (the ``count`` and ``sum`` are the caller's, per call).

    Precision: the rows are copied exactly (float32, bfloat16 and float16 values are float64
    values) and multiplied in float64, so a buffered product is within ``gamma_m^{(64)} |X_i|
    |X_j|``, ``gamma_m^{(64)} = m 2^-53 / (1 - m 2^-53)``, of the exact Gram of its rows: about
    ``3e-14`` relative for ``m = 256``, far below the float32 products of larger calls
    (:class:`Moments`). Which calls share a product therefore changes the moments by float64
    rounding only: shards (``merge``, a process group), blocks and batch sizes give the same
    statistics to ``1e-12``. A float64 product of ``m <= 256`` rows costs about what its float32
    one and the float64 conversion of a ``d x d`` float32 Gram cost (measured on CPU).
    """

    def __init__(self, targets: list[Moments]):
        self.targets = targets
        self._rows: torch.Tensor | None = None
        self._filled = 0

    @staticmethod
    def takes(rows: torch.Tensor) -> bool:
        """Whether a call of these ``(m, d)`` rows is buffered: ``m < ROWS_PER_PRODUCT`` (a larger
        call is its own product) and ``d >= BUFFERED_WIDTH``."""
        return len(rows) < ROWS_PER_PRODUCT and rows.shape[-1] >= BUFFERED_WIDTH

    def append(self, rows: torch.Tensor) -> None:
        """Add the ``(m, d)`` finite ``rows`` (``m <= ROWS_PER_PRODUCT``, any floating dtype)."""
        same = self._rows is not None and rows.device == self._rows.device
        if self._filled and (not same or self._filled + len(rows) > len(self._rows)):
            self.flush()
        if not same:
            self._rows = torch.empty(ROWS_PER_PRODUCT, rows.shape[1], dtype=torch.float64, device=rows.device)
        self._rows[self._filled:self._filled + len(rows)] = rows
        self._filled += len(rows)

    def flush(self) -> None:
        """Multiply the rows held and add their Gram to every target."""
        if not self._filled:
            return
        gram = _gram(self._rows[:self._filled])
        trace = gram.trace()
        for moments in self.targets:
            moments.outer += gram
            moments.square_sum += trace
        self._filled = 0


def computable(activations: torch.Tensor) -> torch.Tensor:
    """``activations`` in a precision the products run in: float32 or float64 as they are,
    anything else (bfloat16, float16, integers) upcast to float32."""
    return activations if activations.dtype in (torch.float32, torch.float64) else activations.float()


@dataclass(frozen=True)
class Spectrum:
    """Principal components of one side of one layer.

    Attributes
    ----------
    eigenvalues : torch.Tensor
        ``(d,)`` float64, descending, of the regularised covariance.
    eigenvectors : torch.Tensor
        ``(d, k)`` float64, column ``j`` belongs to ``eigenvalues[j]``; ``k = d``, or, for a
        covariance known to have rank at most ``k`` (:meth:`factored`), the ``k`` columns whose
        eigenvalues can be non-zero (``eigenvalues[k:]`` are then exactly 0).
    mean : torch.Tensor
        ``(d,)`` float64 mean of the activations.
    regularization : float
        The shrinkage ``alpha`` used.

    Both constructors solve in the precision :func:`rankwise.solvers.solver_dtype` allows for
    ``count`` rows (float32 within the bound stated in :mod:`rankwise.solvers`, else float64).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    mean: torch.Tensor
    regularization: float

    @classmethod
    def shrunk(cls, covariance: torch.Tensor, mean: torch.Tensor, alpha: float,
               prior: torch.Tensor, count: float = 0) -> "Spectrum":
        """Eigen-decomposition of ``(1 - alpha) C + alpha prior`` (negative round-off clamped), for
        a covariance of ``count`` rows (``0``: unknown, solved in float64)."""
        if alpha > 0:
            covariance = (1 - alpha) * covariance + alpha * prior
        values, vectors = descending_eigh(covariance, solver_dtype(len(covariance), count))
        return cls(values, vectors, mean, alpha)

    @classmethod
    def factored(cls, weight: torch.Tensor, covariance: torch.Tensor, mean: torch.Tensor,
                 alpha: float, power: float, count: float) -> "Spectrum":
        """The spectrum of ``W C_reg W^T``, ``C_reg = (1 - alpha) C + alpha power I``, without forming it.

        ``W`` is ``(m, k)`` (an expanding ``Linear`` layer's weight, ``k < m``; for ``k >= m`` the
        ``eigh`` of the formed ``W C_reg W^T``, cheaper than an SVD then) and ``C`` the
        ``(k, k)`` input covariance of ``count`` rows: ``C_reg = V diag(l) V^T`` (``eigh``,
        ``O(k^3)``), ``B = W V diag(l)^(1/2)`` and ``W C_reg W^T = B B^T``, whose eigenvalues and
        ``k`` eigenvectors are the thin SVD of ``B`` (:func:`rankwise.solvers.thin_left_singular`,
        ``O(m k^2)`` instead of ``O(m^3)``; the other ``m - k`` eigenvalues are 0). For
        ``y = W x + b`` this is the output covariance regularised toward ``power W W^T``, exactly
        what :meth:`shrunk` decomposes, at a cost linear in the output width.
        """
        width = weight.shape[1]
        dtype = solver_dtype(max(weight.shape), count)
        if width >= len(weight):  # not expanding: an eigh of the formed W C_reg W^T costs less
            w = weight.to(torch.float64)
            covariance = (1 - alpha) * covariance + alpha * power * torch.eye(width, dtype=w.dtype, device=w.device)
            values, vectors = descending_eigh(w @ covariance @ w.T, dtype)
            return cls(values, vectors, mean, alpha)
        if alpha > 0:
            covariance = (1 - alpha) * covariance + alpha * power * torch.eye(
                width, dtype=covariance.dtype, device=covariance.device)
        values, vectors = descending_eigh(covariance, dtype)
        factor = weight.to(dtype) @ (vectors * values.sqrt()).to(dtype)
        eigenvalues, eigenvectors = thin_left_singular(factor, dtype)
        return cls(eigenvalues, eigenvectors, mean, alpha)
