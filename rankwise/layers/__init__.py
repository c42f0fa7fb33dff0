"""Projected wrappers that replace dense layers (see :class:`ProjectedLayer`)."""

from rankwise.layers.attention import ProjectedMultiheadAttention
from rankwise.layers.base import ProjectedLayer
from rankwise.layers.conv import ProjectedConv
from rankwise.layers.gpt2_conv1d import ProjectedConv1D
from rankwise.layers.embedding import ProjectedEmbedding
from rankwise.layers.linear import ProjectedLinear
from rankwise.layers.gru import ProjectedGRU
from rankwise.layers.lstm import ProjectedLSTM
from rankwise.layers.recurrent import ProjectedRecurrent
from rankwise.layers.tied import TiedEmbedding, TiedHead

__all__ = ["ProjectedLayer", "ProjectedLinear", "ProjectedConv", "ProjectedConv1D", "ProjectedEmbedding", "ProjectedLSTM", "ProjectedGRU",
           "ProjectedMultiheadAttention", "ProjectedRecurrent", "TiedEmbedding", "TiedHead"]
