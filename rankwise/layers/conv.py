"""ProjectedConv: a convolution as ``1x1 conv -> core conv -> 1x1 conv`` in channel space.

**Speed.** A 1x1 convolution is a matrix product over the channels,
``y[n, :, p] = W x[n, :, p] + b`` at every position ``p``. On the CPU, torch's convolution
kernel (oneDNN) can be slow for it on a contiguous (``NCHW``) input whose channel counts are not
multiples of its block (16 with AVX-512): measured alone at 1 thread on 256 maps of 14x14,
16 -> 10 channels took 6.7 ms as a convolution and 0.3 ms as a matrix product; inside the
factored second convolution of the MNIST CNN (50% of its FLOPs removed) the whole layer took
15-19 ms against 17-19 ms unpacked (BENCHMARKS.md, "FLOPs goals and speed"). So on a contiguous
input the projections run as a batched matrix product (:func:`pointwise`); on any other layout
(channels-last, where the convolution kernel is the fast one) as the convolution. The outputs
are the same; the plain layers of :meth:`unpack` keep the convolutions.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.kinds import CONVOLUTIONS
from rankwise.layers.base import ProjectedLayer, fill, global_hooks_registered


class ProjectedConv(ProjectedLayer):
    """A projected ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``.

    The projections are 1x1 convolutions; the core keeps the original kernel size, stride,
    padding, padding mode and dilation. See :class:`ProjectedLayer` for the mathematics.
    """

    @staticmethod
    def _width(module: nn.Module, end: str) -> int:
        return module.out_channels if end == "out" else module.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = self._modules  # read once (see ProjectedLayer: module calls dominate at batch 1)
        in_proj, core, out_proj = modules.get("in_proj"), modules["core"], modules.get("out_proj")
        if in_proj is not None:
            x = pointwise(in_proj, x)
        plain = type(core) in CONVOLUTIONS.values() and not global_hooks_registered()
        x = core._conv_forward(x, core.weight, core.bias) if plain else core(x)
        if out_proj is not None:
            x = pointwise(out_proj, x)
        return x

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


def pointwise(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 1x1 convolution ``conv`` (stride 1, no padding), as a batched matrix
    product over the channels when ``x`` is contiguous (batched or not), else as the convolution."""
    if not x.is_contiguous():
        return conv(x)
    batched = x.dim() == conv.weight.dim()
    rows = (x if batched else x[None]).flatten(2)                       # (N, C, positions)
    weight = conv.weight.flatten(1).expand(rows.shape[0], -1, -1)       # no copy: a stride-0 batch
    y = torch.bmm(weight, rows) if conv.bias is None else torch.baddbmm(conv.bias[:, None], weight, rows)
    return y.reshape(_out_shape(x, conv, batched))


def _out_shape(x: torch.Tensor, conv: nn.Module, batched: bool) -> tuple:
    channel = 1 if batched else 0
    return (*x.shape[:channel], conv.weight.shape[0], *x.shape[channel + 1:])


def _conv_type(like: nn.Module) -> type:
    """The plain torch convolution class of ``like``'s dimensionality."""
    return CONVOLUTIONS[like.weight.dim() - 2]
