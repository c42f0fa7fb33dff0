"""The table of layer kinds: every supported torch type in one row.

"What kind of layer is this, and how is it handled?" has one answer, :data:`KINDS`. Each row
(:class:`LayerKind`) says

- ``name``: the short name shown in tables and infos (``"linear"``, ``"conv2d"``, ``"lstm"``);
- ``types``: the torch classes it covers;
- ``family``: how its statistics are gathered and its options enumerated. ``"dense"``: a
  weight ``W`` of shape ``(out, in, *kernel)`` acting on channel vectors, one observation per
  sample (a ``Linear``, leading dimensions pooled) or per spatial position (a convolution);
  ``"embedding"``: a lookup table ``E`` (``num_embeddings x dim``), which is the ``Linear``
  layer ``W = E^T`` acting on one-hot token vectors, one observation per token;
  ``"recurrent"``: an LSTM or GRU, observed per stacked layer and direction at every time
  step; ``"attention"``: an ``nn.MultiheadAttention``, whose key, value and output
  projections (three ``Linear`` maps, used functionally) are observed through the calls of
  the attention module itself. The statistics of each family are in
  :mod:`rankwise.statistics`, its options in :mod:`rankwise.ranks.frontier`;
- ``sides``: which sides' full second moments are gathered, hence which options exist.
  A ``Linear`` layer analyses its output only: for ``y = W x + b`` the output projection
  ``P P^T`` with ``P`` the top eigenvectors of ``C_y = W C_x W^T`` is the best rank-``r``
  approximation on the data (reduced-rank regression), and input or both-sides projection at
  the same rank cost the same learnables, so they never win. Convolutions and recurrent
  layers analyse both sides;
- ``wrapper``: the name of the :class:`~rankwise.layers.ProjectedLayer` subclass that builds
  its projected form (resolved by name, so this table imports nothing downstream);
- ``refusal``: why a module of this kind may still be refused (``None``: accepted);
- ``transposed``: the layer stores ``W^T`` (``(in, out)``): an embedding's table, GPT-2's
  ``Conv1D`` (``y = x W^T + b`` with ``weight = W^T``). :meth:`LayerKind.weight` always gives ``W``.

A class of an optional dependency is named by its import path (``"transformers.pytorch_utils.
Conv1D"``) and matched only once that module is imported, which it is whenever a model holding
such a layer exists: ``import rankwise`` imports no optional package.

Adding a kind is one row here and one wrapper file in :mod:`rankwise.layers`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class LayerKind:
    """One row of :data:`KINDS`; see the module docstring for the fields."""

    name: str
    types: tuple[type | str, ...]
    family: str
    sides: tuple[str, ...]
    wrapper: str
    refusal: Callable[[nn.Module], str | None]
    transposed: bool = False

    def classes(self) -> tuple[type, ...]:
        """The classes of ``types`` that exist now (a class named by its import path once its
        module is imported)."""
        return tuple(_imported(t) for t in self.types if _imported(t) is not None)

    def statistics_shape(self, layer: nn.Module) -> tuple:
        """What identifies ``layer``'s statistics (to check that statistics belong to it)."""
        if self.family == "recurrent":
            return self.name, layer.input_size, layer.hidden_size, layer.num_layers, layer.bidirectional
        if self.family == "attention":
            return self.name, layer.embed_dim, layer.num_heads, layer.kdim, layer.vdim
        return tuple(self.weight(layer).shape[:2])

    def weight(self, layer: nn.Module):
        """The layer's weight as the matrix ``W`` of ``y = W x + b``: ``(out, in, *kernel)``
        (transposed when the layer stores ``W^T``: an embedding's table, a ``Conv1D``)."""
        return self.stored(layer.weight)

    def stored(self, weight):
        """``weight`` laid out the other way between ``W`` and the layer's storage (its
        transpose for a ``transposed`` kind, itself otherwise): ``stored(weight(layer))`` is
        ``layer.weight``."""
        return weight.T if self.transposed else weight


def _imported(entry: type | str) -> type | None:
    """``entry`` itself, or the class its import path names when that module is imported."""
    if isinstance(entry, type):
        return entry
    module, _, name = entry.rpartition(".")
    return getattr(sys.modules.get(module), name, None)


def _lazy(layer: nn.Module) -> str | None:
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return "it is a lazy layer that has not been initialised yet (run one forward pass first)"
    return None


def _grouped(conv: nn.Module) -> str | None:
    if conv.groups != 1:
        return (f"it is a grouped convolution (groups={conv.groups}); "
                "grouped and depthwise convolutions stay dense")
    return _lazy(conv)


def _lstm(lstm: nn.LSTM) -> str | None:
    if lstm.proj_size:
        return (f"it is an LSTM with proj_size={lstm.proj_size} (its hidden state is already "
                "projected by torch); only LSTMs without proj_size are supported")
    return None


def _accepted(layer: nn.Module) -> None:
    return None


def _embedding(table: nn.Embedding) -> str | None:
    if table.max_norm is not None:
        return (f"it renormalises the rows it looks up (max_norm={table.max_norm}), which a factored "
                "table cannot reproduce")
    return None


def _attention(attention: nn.MultiheadAttention) -> str | None:
    """What the projected attention (:mod:`rankwise.layers.attention`) cannot reproduce."""
    if attention.bias_k is not None:
        return ("it has add_bias_kv=True (learned key and value rows appended to every sequence); "
                "only attention without add_bias_kv is supported")
    if attention.add_zero_attn:
        return "it has add_zero_attn=True; only attention without add_zero_attn is supported"
    if attention.in_proj_bias is None:
        return ("it has no biases (bias=False), where a projected key, value or output projection "
                "keeps its mean in a bias; only attention with biases is supported")
    return None


HF_CONV1D = "transformers.pytorch_utils.Conv1D"
"""GPT-2's linear layer ``y = x weight + bias`` (``weight`` of shape ``(in, out)``)."""

KINDS: tuple[LayerKind, ...] = (
    LayerKind("linear", (nn.Linear,), "dense", ("output",), "ProjectedLinear", _lazy),
    LayerKind("gpt2_conv1d", (HF_CONV1D,), "dense", ("output",), "ProjectedConv1D", _accepted, transposed=True),
    LayerKind("conv1d", (nn.Conv1d,), "dense", ("input", "output"), "ProjectedConv", _grouped),
    LayerKind("conv2d", (nn.Conv2d,), "dense", ("input", "output"), "ProjectedConv", _grouped),
    LayerKind("conv3d", (nn.Conv3d,), "dense", ("input", "output"), "ProjectedConv", _grouped),
    LayerKind("lstm", (nn.LSTM,), "recurrent", ("input", "output"), "ProjectedLSTM", _lstm),
    LayerKind("gru", (nn.GRU,), "recurrent", ("input", "output"), "ProjectedGRU", _accepted),
    LayerKind("embedding", (nn.Embedding,), "embedding", ("output",), "ProjectedEmbedding", _embedding,
              transposed=True),
    LayerKind("attention", (nn.MultiheadAttention,), "attention", ("output",), "ProjectedMultiheadAttention",
              _attention),
)


def kind_of(module: nn.Module) -> LayerKind | None:
    """The row of :data:`KINDS` covering ``module``'s type, or ``None`` when none does.

    Subclasses are covered by their base's row (a ``LazyLinear`` once initialised is a
    ``Linear``); the first matching row wins.
    """
    return next((kind for kind in KINDS if isinstance(module, kind.classes())), None)


def supported_names() -> str:
    """``"Linear, Conv1d, ..."``: the supported torch types, for error messages."""
    return ", ".join(t if isinstance(t, str) else t.__name__
                     for kind in KINDS for t in kind.types)


def kind_named(name: str) -> LayerKind:
    """The row called ``name`` (as stored in statistics and infos)."""
    return next(kind for kind in KINDS if kind.name == name)
