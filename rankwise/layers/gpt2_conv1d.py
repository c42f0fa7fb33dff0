"""ProjectedConv1D: GPT-2's ``Conv1D`` (``y = x A + b``, ``A = W^T`` stored as ``(in, out)``) projected.

The kind ``gpt2_conv1d`` of :data:`rankwise.kinds.KINDS` (the kind ``conv1d`` is ``nn.Conv1d``).

Hugging Face's ``transformers.pytorch_utils.Conv1D`` is a linear layer whose weight is stored
transposed: ``weight`` is ``A = W^T`` of shape ``(in, out)`` and ``y = x A + b``. Read as ``W``
(:meth:`rankwise.kinds.LayerKind.weight`), it is projected exactly as ``nn.Linear`` is
(:class:`~rankwise.layers.base.ProjectedLayer`): with ``P`` (``out x r``) the output basis,
``y ~ P (P^T W x) + mu_y + P P^T (b - mu_y)``. The layer that carries the bias (the output
projection, or the core when the output side is not projected) is a ``Conv1D`` again, of
the original's class, storing its matrix transposed; the bias-free projections before it are
``nn.Linear(bias=False)``. So ``unpack()`` gives plain layers of GPT-2's own kinds, with
``r (in + out) + out`` learnables for an output projection of rank ``r``, as for a ``Linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.kinds import kind_of
from rankwise.layers.base import fill
from rankwise.layers.linear import ProjectedLinear, _linear


class ProjectedConv1D(ProjectedLinear):
    """A projected GPT-2 ``Conv1D``; see the module docstring."""

    @staticmethod
    def _width(module: nn.Module, end: str) -> int:
        """The width at ``end`` of a projection, an ``nn.Linear`` or a ``Conv1D`` alike: the rows
        (``"out"``) or columns (``"in"``) of ``W`` as its kind reads it."""
        return kind_of(module).weight(module).shape[0 if end == "out" else 1]

    @staticmethod
    def _layer(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module) -> nn.Module:
        """``y = W x + b`` as a ``Conv1D`` of ``like``'s class (storing ``W^T``) when it has a
        bias, as ``nn.Linear(bias=False)`` otherwise (a ``Conv1D`` always has a bias)."""
        if bias is None:
            return _linear(weight, None, like)
        with torch.device(weight.device):
            layer = type(like)(weight.shape[0], weight.shape[1]).to(weight.dtype)
        return fill(layer, weight.T, bias, like)
