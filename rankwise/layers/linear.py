"""ProjectedLinear: ``nn.Linear`` as ``Linear(in, r_in) -> Linear(r_in, r_out) -> Linear(r_out, out)``."""

from __future__ import annotations

import torch
from torch import nn

from rankwise.layers.base import ProjectedLayer, fill


class ProjectedLinear(ProjectedLayer):
    """A projected ``nn.Linear``; see :class:`ProjectedLayer` for the mathematics."""

    @staticmethod
    def _width(module: nn.Linear, end: str) -> int:
        return module.out_features if end == "out" else module.in_features

    @classmethod
    def _pointwise(cls, weight, bias, like):
        return cls._layer(weight, bias, like)

    @classmethod
    def _core(cls, like, weight, bias):
        return cls._layer(weight, bias, like)

    @staticmethod
    def _layer(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module) -> nn.Module:
        """``y = W x + b`` (``W`` of shape ``(out, in)``; no bias when ``bias`` is ``None``)."""
        return _linear(weight, bias, like)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    return fill(layer, weight, bias, like)
