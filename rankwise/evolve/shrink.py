"""Shrinking a width to the channels its spectrum keeps.

Let a width have ``m`` channels ``h`` (its producers' outputs), width matrix
``M = U S V^T`` (:mod:`rankwise.evolve.spectrum`), and let ``r < m`` channels be kept. Every
consumer sees the width's channels as ``z`` at its input (after BatchNorm, activation,
pooling, flattening) and computes ``y = C z + c`` plus what its other inputs contribute.

**Which channels stay.**

- *Rotatable widths* (only identity, dropout, average pooling, flattening, additions and
  scalar multiples between producers and consumers, so ``z`` is linear in ``h`` channel by
  channel): the channels are first rotated into the singular basis, ``h~ = U^T h``, i.e.
  ``W_p <- U^T W_p``, ``b_p <- U^T b_p`` for every producer and ``C <- C U`` (channel blocks
  of a flattened input included), which is exact for any orthogonal ``U``; then the first
  ``r`` rotated channels, the top-``r`` singular subspace, are kept.
- *All other widths* (a BatchNorm, an elementwise nonlinearity ``f`` or max pooling in
  between): a rotation does not commute with them, ``f(U^T h) != U^T f(h)``, so rotating
  the channels would change the network. Instead ``r`` of the existing channels ``K`` are
  kept: those chosen by column-pivoted QR of ``U_r^T`` (the top-``r`` left singular
  vectors), the subset selection of Golub, Klema and Stewart, i.e. the ``r`` rows of ``M``
  that best span its dominant row space. Producers keep their rows ``K``, BatchNorms their
  channels ``K``; the other channels ``R`` are removed.

**What replaces the removed channels.** With data, each consumer replaces the removed channels
by their least-squares prediction from the kept ones on the recorded activations,

.. math:: (A, a) = \\arg\\min_{A, a} \\sum_t \\| z_{R,t} - A z_{K,t} - a \\|^2, \\qquad
          C_K \\leftarrow C_K + C_R A, \\quad c \\leftarrow c + C_R a,

with the rows ``t`` pooled over samples and positions, ``a = 0`` when the consumer has no bias,
and for a convolution or a flattened input ``C_R a`` summed over the kernel or the block. A
ridge of ``1e-9`` times the mean diagonal keeps the solve defined. Without data ``A = 0``,
``a = 0``: the removed columns are dropped (a rotatable width keeps ``C U_r``).

**What is exact, and what is a least-squares approximation.**

- Rotatable width, with or without data: exact when the removed singular values are zero
  (then ``U_R^T [W_p, b_p] = 0`` for every producer: the removed rotated channels are zero).
- With data: exact on the recorded data when the removed channels are affine functions of the
  kept ones there (dead or constant units, duplicated or linearly dependent channels); for a
  convolution with zero padding the intercept ``a`` is exact only away from the borders. For a
  ``Linear`` consumer the fit is exactly the least-squares refit of its output on the data;
  for a convolution or a flattened input it is the least-squares fit with one ``A`` shared by
  every position and kernel offset.
- Without data, a removed channel behind a nonlinearity is exact only when it contributes
  nothing (its consumer columns are zero, or its output is zero, e.g. a dead ReLU).
- Anything else is a least-squares approximation, for the training that follows to absorb.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.evolve.edits import Plan, expand_blocks, removal
from rankwise.evolve.widths import Consumer, WidthGroup
from rankwise.evolve.spectrum import width_matrix
from rankwise.kinds import BATCHNORM_TENSORS, size_attributes

RIDGE = 1e-9


def select_channels(top: torch.Tensor) -> torch.Tensor:
    """Column-pivoted QR of ``top^T``: the ``r`` rows of ``top`` (``m x r``) spanning it best.

    Greedy: take the row of largest norm, project it out of every row, repeat ``r`` times.

    Returns
    -------
    torch.Tensor
        The chosen row indices, sorted.
    """
    residual = top.T.clone()                                   # r x m, columns = channels
    chosen = []
    for _ in range(top.shape[1]):
        norms = residual.square().sum(0)
        norms[chosen] = -1.0
        pick = int(norms.argmax())
        chosen.append(pick)
        direction = residual[:, pick] / residual[:, pick].norm().clamp_min(1e-300)
        residual -= torch.outer(direction, direction @ residual)
    return torch.tensor(sorted(chosen))


def channel_basis(model: nn.Module, group: WidthGroup, kept: int):
    """``(rotation, keep)``: the basis the width is expressed in and the channels kept in it.

    ``rotation`` is the ``m x m`` left singular basis ``U`` of a rotatable width (keep its
    first ``kept`` columns) and ``None`` otherwise (keep the channels of :func:`select_channels`).
    """
    matrix = width_matrix(model, group)
    left = torch.linalg.svd(matrix, full_matrices=matrix.shape[0] > matrix.shape[1])[0]
    if group.rotatable:
        return left, torch.arange(kept)
    return None, select_channels(left[:, :kept])


def plan_shrink(model: nn.Module, group: WidthGroup, kept: int, moments: dict | None = None) -> Plan:
    """Plan the shrink of ``group`` to ``kept`` channels (module docstring).

    Parameters
    ----------
    model : torch.nn.Module
    group : WidthGroup
        A width that may change, as analysed on ``model`` now.
    kept : int
        Channels to keep, ``1 <= kept <= group.width``.
    moments : dict, optional
        ``{index of the consumer in group.consumers: Moments of its input channels}``; the
        least-squares refit uses them, and without them the removed columns are dropped.

    Returns
    -------
    Plan
        Not yet applied.
    """
    plan = Plan(model)
    rotation, keep = channel_basis(model, group, kept)
    removed = removal(group.width, keep) if rotation is None else torch.arange(kept, group.width)
    _plan_producers(plan, group, rotation, keep)
    _plan_batchnorms(plan, group, keep)
    for index, consumer in enumerate(group.consumers):
        layer = plan.modules[consumer.name]
        fit = None
        if moments is not None:
            fit = least_squares(moments[index], rotation, keep, removed, intercept=layer.bias is not None)
        _plan_consumer(plan, consumer, group.width, rotation, keep, removed, fit)
    return plan


def least_squares(moments, rotation, keep, removed, intercept: bool):
    """``(A, a)`` of the fit ``z_R ~ A z_K + a`` from the moments of ``z`` (``a`` None without intercept).

    In a rotated basis ``z~ = U^T z`` the moments are ``U^T mu`` and ``U^T S U``. With the
    augmented kept channels ``x = [z_K; 1]``, ``[A, a] = E[z_R x^T] (E[x x^T] + lambda I)^{-1}``.
    """
    mean, second = moments.mean, moments.second_moment
    if rotation is not None:
        mean, second = rotation.T @ mean, rotation.T @ second @ rotation
    gram = second[keep][:, keep]
    cross = second[removed][:, keep]
    if intercept:
        gram = torch.cat([torch.cat([gram, mean[keep, None]], 1),
                          torch.cat([mean[keep], mean.new_ones(1)])[None]], 0)
        cross = torch.cat([cross, mean[removed, None]], 1)
    ridge = RIDGE * gram.diagonal().mean().clamp_min(1e-300)
    coefficients = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype,
                                                               device=gram.device), cross.T).T
    if intercept:
        return coefficients[:, :-1], coefficients[:, -1]
    return coefficients, None


def _plan_producers(plan: Plan, group: WidthGroup, rotation, keep) -> None:
    for name in group.producers:
        for tensor_name in ("weight", "bias"):
            value = plan.current(name, tensor_name)
            if value is None:
                continue
            if rotation is None:
                plan.resize(name, tensor_name, 0, keep)
            else:
                rows = rotation[:, :len(keep)].T @ value.to(torch.float64).reshape(group.width, -1)
                plan.replace(name, tensor_name, rows.reshape(len(keep), *value.shape[1:]), 0,
                             torch.full((len(keep),), -1))
        plan.set_size(name, size_attributes(plan.modules[name])[1], len(keep))


def _plan_batchnorms(plan: Plan, group: WidthGroup, keep) -> None:
    for member in group.batchnorms:
        total = plan.modules[member.name].num_features
        start, stop = member.offset, member.offset + group.width
        source = torch.cat([torch.arange(start), keep + start, torch.arange(stop, total)])
        for tensor_name in BATCHNORM_TENSORS:
            plan.resize(member.name, tensor_name, 0, source)
        plan.set_size(member.name, "num_features", len(source))


def _plan_consumer(plan: Plan, consumer: Consumer, width: int, rotation, keep, removed, fit) -> None:
    """New input columns (and bias) of one consumer; see the module docstring."""
    weight = plan.current(consumer.name, "weight")
    out, total = weight.shape[0], weight.shape[1] // consumer.block
    columns = weight.to(torch.float64, copy=True).reshape(out, total, -1)
    start, stop = consumer.offset, consumer.offset + width
    own = columns[:, start:stop]
    if rotation is not None:
        own = torch.einsum("ojr,jk->okr", own, rotation)
    if fit is not None:
        absorbed, intercept = fit
        own[:, keep] += torch.einsum("ojr,jk->okr", own[:, removed], absorbed)
        if intercept is not None:
            bias = plan.current(consumer.name, "bias").to(torch.float64)
            plan.replace(consumer.name, "bias", bias + torch.einsum("ojr,j->o", own[:, removed], intercept))
    new = torch.cat([columns[:, :start], own[:, keep], columns[:, stop:]], 1)
    kept_source = keep + start if rotation is None else torch.full((len(keep),), -1)
    source = torch.cat([torch.arange(start), kept_source, torch.arange(stop, total)])
    new = new.reshape(out, -1, *weight.shape[2:])
    plan.replace(consumer.name, "weight", new, 1, expand_blocks(source, consumer.block))
    plan.set_size(consumer.name, size_attributes(plan.modules[consumer.name])[0], new.shape[1])
