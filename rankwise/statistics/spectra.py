"""Regularised spectra: principal components that survive thin calibration data.

A side of a layer is described by the covariance ``C = S / n - mu mu^T`` of its activation
rows (``mu = s / n``, see :class:`rankwise.moments.Moments`), eigen-decomposed once per layer,
side and cell. With thin data (``n`` not much larger than the width ``d``) the sample
covariance is rank-deficient and a projection would delete every direction the data did not
show, so each side is shrunk toward what isotropic inputs of the same power would give::

    C_reg = (1 - alpha) C + alpha P,        alpha = d / (n + d)   ("auto"),

or the ``alpha`` in ``[0, 1]`` the user gives. The prior ``P`` is ``s I`` with
``s = tr(C_x) / d_in`` for a side read by the weights (a dense layer's input, both sides of a
recurrent cell), and ``s W W^T`` for a dense layer's output (the output covariance of
isotropic inputs of power ``s``; ``W`` matricised as ``(out, in * kernel)``). For a ``Linear``
layer ``C_y,reg = W C_x,reg W^T`` exactly, so both sides stay consistent, and as ``n / d``
shrinks the output principal directions tend to the left singular vectors of ``W``:
projection degrades toward data-free truncated SVD instead of collapsing.
"""

from __future__ import annotations


def shrinkage(regularization, count: float, width: int) -> float:
    """The shrinkage ``alpha``: ``width / (count + width)`` for ``"auto"``, else ``regularization``.

    Parameters
    ----------
    regularization : "auto" or float
        The user's setting (checked by :func:`rankwise.checks.check_regularization`).
    count : float
        ``n``, the observations seen.
    width : int
        ``d``, the largest analysed width of the layer (or cell).
    """
    return width / (count + width) if regularization == "auto" else float(regularization)
