"""Projected wrappers that replace dense layers (see :class:`ProjectedLayer`)."""

from rankwise.layers.base import ProjectedLayer
from rankwise.layers.conv import ProjectedConv
from rankwise.layers.linear import ProjectedLinear

__all__ = ["ProjectedLayer", "ProjectedLinear", "ProjectedConv"]
