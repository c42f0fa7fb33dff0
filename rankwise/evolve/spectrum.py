"""The singular values of a width: how many of its channels the incoming weights really use.

A width's channels are the rows of its producers' weights. For one producer ``y = W x + b``
(``W`` matricised as ``(out, in * kernel)``) followed directly by a BatchNorm, the eval-mode
map from the producer's input to the BatchNorm's output is affine with rows

.. math:: \\tilde W = D W, \\quad \\tilde b = D (b - \\mu) + \\beta, \\quad
          D = \\operatorname{diag}(\\gamma / \\sqrt{\\sigma^2 + \\epsilon}),

(``mu``, ``sigma^2`` the running statistics; ``D = I``, ``beta = 0`` without a BatchNorm), so a
channel whose BatchNorm scale ``gamma`` is zero has a zero row whatever ``W`` holds. The
*width matrix* puts, for every producer ``p`` of the width (several when additions tie them),
the block ``[W~_p, b~_p]`` side by side, each block scaled to unit Frobenius norm so that
tied producers weigh the same:

.. math:: M = \\big[\\, [\\tilde W_1, \\tilde b_1] / \\|\\cdot\\|_F, \\;\\ldots,\\;
          [\\tilde W_k, \\tilde b_k] / \\|\\cdot\\|_F \\,\\big] \\in \\mathbb{R}^{m \\times n}.

Its singular values ``s_1 >= s_2 >= ...`` (padded with zeros to the width ``m`` when
``n < m``) are the width's spectrum. ``M = U S V^T``: the columns of ``U`` are directions in
channel space, the rows of ``V^T`` directions in input space.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.evolve.widths import WidthGroup


def effective_rows(producer: nn.Module, batchnorm: nn.Module | None) -> torch.Tensor:
    """``[D W, D (b - mu) + beta]`` of one producer, in float64, one row per output channel."""
    weight = producer.weight.detach().to(torch.float64).reshape(producer.weight.shape[0], -1)
    bias = (producer.bias.detach().to(torch.float64) if producer.bias is not None
            else weight.new_zeros(weight.shape[0]))
    if batchnorm is not None:
        scale, shift = batchnorm_affine(batchnorm)
        weight, bias = scale[:, None] * weight, scale * bias + shift
    return torch.cat([weight, bias[:, None]], dim=1)


def batchnorm_affine(batchnorm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D, t)`` of the eval-mode BatchNorm ``x -> D x + t``, in float64.

    Without running statistics the BatchNorm normalises by batch statistics even in eval
    mode; it is then taken as ``D = gamma``, ``t = beta``.
    """
    channels = batchnorm.num_features
    ones = torch.ones(channels, dtype=torch.float64, device=_device(batchnorm))
    gamma = batchnorm.weight.detach().to(torch.float64) if batchnorm.affine else ones
    beta = batchnorm.bias.detach().to(torch.float64) if batchnorm.affine else torch.zeros_like(ones)
    if batchnorm.running_var is None:
        return gamma, beta
    scale = gamma / torch.sqrt(batchnorm.running_var.to(torch.float64) + batchnorm.eps)
    return scale, beta - scale * batchnorm.running_mean.to(torch.float64)


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.state_dict().values()), torch.empty(0)).device


def width_matrix(model: nn.Module, group: WidthGroup) -> torch.Tensor:
    """The ``(m, n)`` width matrix ``M`` of ``group`` (module docstring), float64."""
    modules = dict(model.named_modules())
    blocks = []
    for name in group.producers:
        folded = group.folded_batchnorms.get(name)
        rows = effective_rows(modules[name], modules[folded] if folded else None)
        norm = torch.linalg.matrix_norm(rows)
        blocks.append(rows / norm if norm > 0 else rows)
    return torch.cat(blocks, dim=1)


def spectrum(model: nn.Module, group: WidthGroup) -> torch.Tensor:
    """Singular values of the width matrix, descending, zero-padded to the width ``m``."""
    matrix = width_matrix(model, group)
    values = torch.linalg.svdvals(matrix)
    return torch.cat([values, values.new_zeros(max(0, matrix.shape[0] - len(values)))])


def kept_count(values: torch.Tensor, tol: float) -> int:
    """How many singular values are not below ``tol`` times the largest: ``#{i : s_i >= tol s_1}``.

    Values *strictly* below ``tol * s_1`` are negligible; with ``tol = 0`` none is, so every
    direction is kept (zero values included, as ``0 >= 0``).
    """
    if values[0] <= 0:
        return len(values)
    return int((values >= tol * values[0]).sum())


def is_saturated(values: torch.Tensor, tol: float) -> bool:
    """True when even the smallest singular value is at least ``tol`` times the largest.

    A width wider than its producers' inputs (``m > n``) has zero values and is never saturated.
    """
    return bool(values[0] > 0 and values[-1] >= tol * values[0])
