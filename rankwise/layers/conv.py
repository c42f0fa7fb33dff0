"""ProjectedConv: a convolution as ``1x1 conv -> core conv -> 1x1 conv`` in channel space."""

from __future__ import annotations

from torch import nn

from rankwise.kinds import CONVOLUTIONS
from rankwise.layers.base import ProjectedLayer, fill


class ProjectedConv(ProjectedLayer):
    """A projected ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``.

    The projections are 1x1 convolutions; the core keeps the original kernel size, stride,
    padding, padding mode and dilation. See :class:`ProjectedLayer` for the mathematics.
    """

    @staticmethod
    def _width(module: nn.Module, end: str) -> int:
        return module.out_channels if end == "out" else module.in_channels

    @classmethod
    def _pointwise(cls, weight, bias, like):
        kernel = (1,) * (like.weight.dim() - 2)
        layer = _conv_type(like)(weight.shape[1], weight.shape[0], kernel, bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
        return fill(layer, weight.reshape(*weight.shape, *kernel), bias, like)

    @classmethod
    def _core(cls, like, weight, bias):
        layer = _conv_type(like)(weight.shape[1], weight.shape[0], like.kernel_size, stride=like.stride,
                           padding=like.padding, dilation=like.dilation, bias=bias is not None,
                           padding_mode=like.padding_mode, device=weight.device, dtype=weight.dtype)
        return fill(layer, weight, bias, like)


def _conv_type(like: nn.Module) -> type:
    """The plain torch convolution class of ``like``'s dimensionality."""
    return CONVOLUTIONS[like.weight.dim() - 2]
