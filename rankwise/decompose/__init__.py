"""Tensor-network truncation of convolution kernels: cuts, Tucker, CP and tensor trains.

:func:`truncate_kernels` is the entry point; :class:`TruncatedConv` the layer it builds.
"""

from rankwise.decompose.api import LayerTruncation, TruncationInfo, truncate_kernels
from rankwise.decompose.execution import TruncatedConv
from rankwise.decompose.legs import bipartitions

__all__ = ["truncate_kernels", "TruncationInfo", "LayerTruncation", "TruncatedConv", "bipartitions"]
