"""The table of layer kinds: every supported torch type in one row, and every other fact about torch types.

"What kind of layer is this, and how is it handled?" has one answer, :data:`KINDS`. Each row
(:class:`LayerKind`) says

- ``name``: the short name shown in tables and infos (``"linear"``, ``"conv2d"``, ``"lstm"``);
- ``types``: the torch classes it covers;
- ``family``: how its statistics are gathered and its options enumerated, the key of its
  :class:`Family` entry in :data:`FAMILIES`. ``"dense"``: a weight ``W`` of shape
  ``(out, in, *kernel)`` acting on channel vectors, one observation per sample (a ``Linear``,
  leading dimensions pooled) or per spatial position (a convolution); ``"embedding"``: a
  lookup table ``E`` (``num_embeddings x dim``), which is the ``Linear`` layer ``W = E^T``
  acting on one-hot token vectors, one observation per token; ``"recurrent"``: an LSTM or
  GRU, observed per stacked layer and direction at every time step; ``"attention"``: an
  ``nn.MultiheadAttention``, whose key, value and output projections (three ``Linear`` maps,
  used functionally) are observed through the calls of the attention module itself. The
  statistics of each family are in :mod:`rankwise.statistics`, its options in
  :mod:`rankwise.ranks.frontier`;
- ``sides``: which sides' full second moments are gathered, hence which options exist.
  A ``Linear`` layer analyses its output only: for ``y = W x + b`` the output projection
  ``P P^T`` with ``P`` the top eigenvectors of ``C_y = W C_x W^T`` is the best rank-``r``
  approximation on the data (reduced-rank regression), and input or both-sides projection at
  the same rank cost the same learnables, so they never win. Convolutions and recurrent
  layers analyse both sides;
- ``wrapper``: the :class:`~rankwise.layers.ProjectedLayer` subclass that builds its
  projected form, or its name in :mod:`rankwise.layers` (so that this table imports nothing
  downstream);
- ``refusal``: why a module of this kind may still be refused (``None``: accepted);
- ``transposed``: the layer stores ``W^T`` (``(in, out)``): an embedding's table, GPT-2's
  ``Conv1D`` (``y = x W^T + b`` with ``weight = W^T``). :meth:`LayerKind.weight` always gives ``W``;
- ``sizes``: the attributes holding its input and output widths, for the kinds whose width can
  change in place (:class:`~rankwise.WidthEvolver`; a saved file's shape spec); empty otherwise.

A class of an optional dependency is named by its import path (``"transformers.pytorch_utils.
Conv1D"``) and matched only once that module is imported, which it is whenever a model holding
such a layer exists: ``import rankwise`` imports no optional package.

The other facts about torch types live here too, so that no other module asks ``isinstance``
about a torch layer type: the convolutions by dimensionality (:data:`CONVOLUTIONS`), the
BatchNorms (:func:`is_batchnorm`, :data:`BATCHNORM_TENSORS`), the size attributes of resizable
layers (:func:`size_attributes`) and torch's fused transformer paths
(:data:`FUSED_PATH_SWITCHES`).

**Adding a kind** is one row here (with, for a new wrapper, one file in :mod:`rankwise.layers`);
a user adds a kind for a layer type of their own with :func:`register_kind`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class Family:
    """How the layers of one family are handled: read instead of asking which family a layer is.

    Attributes
    ----------
    name : str
        The family's name, the ``family`` of its rows.
    signature : callable
        ``signature(kind, layer) -> tuple``: what identifies ``layer``'s statistics, so that
        statistics can be checked to belong to it (:meth:`LayerKind.statistics_shape`).
    per_part : bool
        Options, bases and ranks are per part: the cells of a recurrence (stacked layers and
        directions), the key, value and output maps of an attention; its ranks are tuples.
    batchnorm_after : bool
        A BatchNorm that alone reads its output normalises its output channels: it can be folded
        into the layer (:func:`rankwise.fold_batchnorm`), and the variance criterion measures the
        layer's error after it (:func:`rankwise.metric.batchnorm_metrics`).
    refittable : bool
        Its weight reads rows of its input (a ``Linear``'s vectors, a convolution's patches), so
        that sequential correction can refit it by least squares (:mod:`rankwise.correction`).
    gradients : bool
        ``NeuronPCA(loss_fn=...)`` gathers the Fisher information of its output, so that the
        ``"loss"`` criterion can judge it.
    sequences : bool
        Its statistics keep calibration sequences, and its choices are measured through its
        recurrence (:class:`rankwise.ranks.SequenceBound`).
    functional_children : tuple of str
        Children whose weights it uses itself without calling them (an attention's
        ``out_proj``): they are no candidates of their own, and the layer is listed whole.
    generic : bool
        Its statistics and wrappers need nothing of a layer but its ``weight``, ``bias`` and
        calls, so that a user's own layer type can join it (:func:`register_kind`).
    """

    name: str
    signature: Callable[["LayerKind", nn.Module], tuple]
    per_part: bool
    batchnorm_after: bool
    refittable: bool
    gradients: bool
    sequences: bool
    functional_children: tuple[str, ...]
    generic: bool


@dataclass(frozen=True)
class LayerKind:
    """One row of :data:`KINDS`; see the module docstring for the fields."""

    name: str
    types: tuple[type | str, ...]
    family: str
    sides: tuple[str, ...]
    wrapper: str | type
    refusal: Callable[[nn.Module], str | None]
    transposed: bool = False
    sizes: tuple[str, ...] = ()

    @property
    def traits(self) -> Family:
        """The :class:`Family` entry of this row's family."""
        return FAMILIES[self.family]

    def classes(self) -> tuple[type, ...]:
        """The classes of ``types`` that exist now (a class named by its import path once its
        module is imported)."""
        return tuple(_imported(t) for t in self.types if _imported(t) is not None)

    def statistics_shape(self, layer: nn.Module) -> tuple:
        """What identifies ``layer``'s statistics (to check that statistics belong to it)."""
        return self.traits.signature(self, layer)

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


def _weight_shape(kind: LayerKind, layer: nn.Module) -> tuple:
    return tuple(kind.weight(layer).shape[:2])


def _recurrent_shape(kind: LayerKind, layer: nn.Module) -> tuple:
    return kind.name, layer.input_size, layer.hidden_size, layer.num_layers, layer.bidirectional


def _attention_shape(kind: LayerKind, layer: nn.Module) -> tuple:
    return kind.name, layer.embed_dim, layer.num_heads, layer.kdim, layer.vdim


FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("dense", _weight_shape, per_part=False, batchnorm_after=True, refittable=True, gradients=True,
           sequences=False, functional_children=(), generic=True),
    Family("embedding", _weight_shape, per_part=False, batchnorm_after=False, refittable=False, gradients=True,
           sequences=False, functional_children=(), generic=True),
    Family("recurrent", _recurrent_shape, per_part=True, batchnorm_after=False, refittable=False,
           gradients=False, sequences=True, functional_children=(), generic=False),
    Family("attention", _attention_shape, per_part=True, batchnorm_after=False, refittable=False,
           gradients=False, sequences=False, functional_children=("out_proj",), generic=False),
)}
"""The entry of each family of :data:`KINDS` (see :class:`Family`)."""


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


CONVOLUTIONS: dict[int, type] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
"""torch's convolution of each number of spatial dimensions."""

HF_CONV1D = "transformers.pytorch_utils.Conv1D"
"""GPT-2's linear layer ``y = x weight + bias`` (``weight`` of shape ``(in, out)``)."""

LINEAR_SIZES, CONV_SIZES = ("in_features", "out_features"), ("in_channels", "out_channels")

KINDS: list[LayerKind] = [
    LayerKind("linear", (nn.Linear,), "dense", ("output",), "ProjectedLinear", _lazy, sizes=LINEAR_SIZES),
    LayerKind("gpt2_conv1d", (HF_CONV1D,), "dense", ("output",), "ProjectedConv1D", _accepted, transposed=True),
    *(LayerKind(f"conv{dims}d", (conv,), "dense", ("input", "output"), "ProjectedConv", _grouped, sizes=CONV_SIZES)
      for dims, conv in CONVOLUTIONS.items()),
    LayerKind("lstm", (nn.LSTM,), "recurrent", ("input", "output"), "ProjectedLSTM", _lstm),
    LayerKind("gru", (nn.GRU,), "recurrent", ("input", "output"), "ProjectedGRU", _accepted),
    LayerKind("embedding", (nn.Embedding,), "embedding", ("output",), "ProjectedEmbedding", _embedding,
              transposed=True),
    LayerKind("attention", (nn.MultiheadAttention,), "attention", ("output",), "ProjectedMultiheadAttention",
              _attention),
]
"""One row per supported layer kind; a user's own rows (:func:`register_kind`) come first."""


def kind_of(module: nn.Module) -> LayerKind | None:
    """The row of :data:`KINDS` covering ``module``'s type, or ``None`` when none does.

    Subclasses are covered by their base's row (a ``LazyLinear`` once initialised is a
    ``Linear``); the first matching row wins, so that a row registered for a subclass of a
    supported type (:func:`register_kind`) is the one that covers it.
    """
    return next((kind for kind in KINDS if isinstance(module, kind.classes())), None)


def supported_names() -> str:
    """``"Linear, Conv1d, ..."``: the supported torch types, for error messages."""
    return ", ".join(t if isinstance(t, str) else t.__name__
                     for kind in KINDS for t in kind.types)


def kind_named(name: str) -> LayerKind:
    """The row called ``name`` (as stored in statistics and infos)."""
    return next(kind for kind in KINDS if kind.name == name)


def register_kind(name: str, types, *, wrapper: type, family: str = "dense", sides=("output",),
                  refusal: Callable[[nn.Module], str | None] | None = None,
                  transposed: bool = False) -> LayerKind:
    """Make a layer type of your own a supported kind: analysed, projected, saved and loaded.

    As Torch-Pruning's ``register_customized_layer`` and peft's custom modules do, a row is
    added to :data:`KINDS`, before the built-in rows (so that it also covers a subclass of a
    supported type). The layer must compute ``y = W x + b`` from its ``weight`` (``W`` of shape
    ``(out, in)``, ``(in, out)`` with ``transposed=True``) and its ``bias`` (or ``None``), on its
    input's last axis (or axis 1, with a convolution's kernel). ``wrapper`` builds the projected
    form from ``W`` alone: the compressed model holds plain torch layers, and
    ``rankwise.load(path, model=original)`` rebuilds them on the original's layers. The README's
    section "Your own layer types" has an example.

    Parameters
    ----------
    name : str
        The kind's short name, shown in tables and infos; not one of the existing rows'.
    types : type or tuple of type
        The ``torch.nn.Module`` subclasses it covers.
    wrapper : type
        The :class:`~rankwise.layers.ProjectedLayer` subclass that builds the projected form:
        ``rankwise.ProjectedLinear`` for a map of the last axis, ``rankwise.ProjectedConv`` for a
        convolution.
    family : str
        A family of :data:`FAMILIES` open to other types (``"dense"`` or ``"embedding"``).
    sides : tuple of str
        The sides analysed, ``("output",)``, ``("input",)`` or both: the input side is worth
        analysing where the weight has a kernel (a convolution), see the module docstring.
    refusal : callable, optional
        ``refusal(module) -> str or None``: why a module of the kind is refused (``None``
        accepts it); every module is accepted when omitted.
    transposed : bool
        The layer stores ``W^T``, of shape ``(in, out)``.

    Returns
    -------
    LayerKind
        The new row.

    Raises
    ------
    ValueError
        Naming the argument that is wrong: a ``name`` in use, a type that is no module class or
        that a row already names, a family closed to other types, a ``wrapper`` without
        ``from_dense`` / ``from_spec``, unknown ``sides``, a ``refusal`` that is not callable.
    """
    types = types if isinstance(types, tuple) else (types,)
    sides = (sides,) if isinstance(sides, str) else tuple(sides)
    named = {t: kind.name for kind in KINDS for t in kind.classes()}
    open_families = [entry.name for entry in FAMILIES.values() if entry.generic]
    problems = {
        "name": (not isinstance(name, str) or not name or name in {kind.name for kind in KINDS},
                 f"expected a new kind name (a non-empty string), got {name!r}; the rows are "
                 f"{', '.join(kind.name for kind in KINDS)}"),
        "types": (not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types),
                  f"expected one or more torch.nn.Module subclasses, got {types!r}"),
        "family": (family not in open_families, f"expected one of {', '.join(map(repr, open_families))} (the "
                   f"families whose statistics read only a layer's weight, bias and calls), got {family!r}"),
        "sides": (not sides or not set(sides) <= {"input", "output"} or len(set(sides)) != len(sides),
                  f"expected ('output',), ('input',) or ('input', 'output'), got {sides!r}"),
        "wrapper": (not (isinstance(wrapper, type) and all(callable(getattr(wrapper, call, None))
                                                           for call in ("from_dense", "from_spec"))),
                    f"expected a ProjectedLayer subclass (e.g. rankwise.ProjectedLinear), got {wrapper!r}"),
        "refusal": (refusal is not None and not callable(refusal),
                    f"expected a function module -> reason or None, got {refusal!r}")}
    for argument, (wrong, expected) in problems.items():
        if wrong:
            raise ValueError(f"{argument}: {expected}.")
    taken = next((t for t in types if t in named), None)
    if taken is not None:
        raise ValueError(f"types: {taken.__name__} is already the kind {named[taken]!r}; register a subclass "
                         "of it to handle it otherwise.")
    row = LayerKind(name, types, family, sides, wrapper, refusal or _accepted, bool(transposed))
    KINDS.insert(0, row)
    return row


# Other facts about torch layer types -----------------------------------------------------------

BATCHNORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
"""The per-channel tensors of a BatchNorm (``weight`` and ``bias`` are ``None`` without affine)."""

FUSED_PATH_SWITCHES = {nn.TransformerEncoderLayer: "activation_relu_or_gelu",
                       nn.TransformerEncoder: "use_nested_tensor"}
"""The attribute that lets each of torch's transformer modules take its fused fast path, which
reads its children's dense weights instead of calling them (:func:`rankwise.forms.fused_paths_off`)."""


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def is_fused_recurrence(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch's recurrent layers run by its fused kernels (``nn.LSTM``,
    ``nn.GRU``, ``nn.RNN``: the subclasses of ``nn.RNNBase``)."""
    return isinstance(module, nn.RNNBase)


def convolution_dims(module: nn.Module) -> int | None:
    """The spatial dimensions of a torch convolution (:data:`CONVOLUTIONS`), ``None`` for another module."""
    return next((dims for dims, conv in CONVOLUTIONS.items() if isinstance(module, conv)), None)


def channels_last(layer: nn.Module) -> bool:
    """Whether a dense-family layer reads its input channels on its input's last axis (a ``Linear``:
    ``W`` of shape ``(out, in)``) rather than on axis 1 (a convolution, ``W`` of shape ``(out, in, *kernel)``)."""
    return kind_of(layer).weight(layer).dim() == 2


def size_attributes(module: nn.Module) -> tuple[str, ...]:
    """The attributes holding the sizes of a layer whose width can change: its kind's ``sizes``
    (``("in_features", "out_features")``, ``("in_channels", "out_channels")``), a BatchNorm's
    ``("num_features",)``; empty for other modules."""
    if is_batchnorm(module):
        return ("num_features",)
    kind = kind_of(module)
    return () if kind is None else kind.sizes


def fused_path_switch(module: nn.Module) -> str | None:
    """The attribute of :data:`FUSED_PATH_SWITCHES` of ``module``'s type, ``None`` for other modules."""
    return next((name for kind, name in FUSED_PATH_SWITCHES.items() if isinstance(module, kind)), None)
