"""Growing a width by new channels that leave the network's function unchanged.

Adding ``n`` channels to a width of ``m``:

- every producer ``y = W x + b`` (``W`` matricised as ``(m, d)``, ``W = U S V^T``) gets ``n``
  new rows orthogonal to its existing right singular vectors (the span of its rows), drawn at
  random in the orthogonal complement of that span, orthonormalised, and scaled to the mean
  norm of the existing rows; their bias is zero. Only ``d - rank(W)`` such directions exist:
  rows beyond that are random unit directions scaled the same way (not orthogonal);
- every BatchNorm of the width gets ``n`` fresh channels: ``gamma = 1``, ``beta = 0``, running
  mean 0, running variance 1;
- every consumer gets zero input columns for the new channels (``n * block`` zero features
  after a Flatten), inserted right after the width's existing columns.

The new channels reach the consumers only through zero weights (residual additions pass them
on to further consumers of the same width, which have zero columns too), so the network's
output is exactly unchanged at the moment of growth, in train and eval mode alike. Training
then moves the zero columns first (their gradient is the new channels' activations times the
consumers' output gradients) and the new rows after them.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.evolve.edits import Plan, expand_blocks, insertion
from rankwise.evolve.widths import WidthGroup
from rankwise.kinds import BATCHNORM_TENSORS, size_attributes

NEW_BATCHNORM_VALUES = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}


def new_rows(weight: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` rows orthogonal to the rows of ``weight`` (``(m, d)``), scaled like them.

    Returns
    -------
    torch.Tensor
        ``(count, d)`` float64.
    """
    weight = weight.to(torch.float64)
    dim = weight.shape[1]
    _, values, right = torch.linalg.svd(weight, full_matrices=False)
    rank = int((values > values[0] * dim * torch.finfo(torch.float64).eps).sum())
    draws = torch.randn(count, dim, generator=generator, dtype=torch.float64).to(weight.device)
    span = right[:rank]
    free = min(count, dim - rank)
    orthogonal = draws[:free] - (draws[:free] @ span.T) @ span
    directions = torch.cat([torch.linalg.qr(orthogonal.T)[0].T, draws[free:]])
    directions = directions / directions.norm(dim=1, keepdim=True)
    scale = weight.norm(dim=1).mean()
    return directions * (scale if scale > 0 else 1.0 / dim ** 0.5)


def plan_grow(model: nn.Module, group: WidthGroup, count: int, generator: torch.Generator) -> Plan:
    """Plan ``count`` new channels for ``group`` (module docstring); not yet applied."""
    plan = Plan(model)
    for name in group.producers:
        _plan_producer(plan, name, group.width, count, generator)
    for member in group.batchnorms:
        total = plan.modules[member.name].num_features
        source = insertion(total, member.offset + group.width, count)
        for tensor_name in BATCHNORM_TENSORS:
            plan.resize(member.name, tensor_name, 0, source, NEW_BATCHNORM_VALUES[tensor_name])
        plan.set_size(member.name, "num_features", total + count)
    for consumer in group.consumers:
        weight = plan.current(consumer.name, "weight")
        total = weight.shape[1] // consumer.block
        source = insertion(total, consumer.offset + group.width, count)
        plan.resize(consumer.name, "weight", 1, expand_blocks(source, consumer.block))
        plan.set_size(consumer.name, size_attributes(plan.modules[consumer.name])[0],
                      (total + count) * consumer.block)
    return plan


def _plan_producer(plan: Plan, name: str, width: int, count: int, generator) -> None:
    weight = plan.current(name, "weight")
    rows = new_rows(weight.reshape(width, -1), count, generator)
    source = insertion(width, width, count)
    plan.resize(name, "weight", 0, source, rows.reshape(count, *weight.shape[1:]))
    plan.resize(name, "bias", 0, source, 0.0)
    plan.set_size(name, size_attributes(plan.modules[name])[1], width + count)
