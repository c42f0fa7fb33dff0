"""The protocol every compressed form answers, and the shape spec of resized layers.

A *compressed form* is a module that replaced one dense layer: a projected wrapper
(:class:`~rankwise.layers.ProjectedLayer`, the recurrent ones included) or a truncated
convolution (:class:`~rankwise.decompose.TruncatedConv`). Each answers three calls:

- ``form.spec()``: a plain, JSON-friendly dict, ``{"type": <class name>, ...}``, describing
  the structure (ranks, method, ...) but no weight;
- ``Form.from_spec(dense_layer, spec)``: a module of that structure for the dense layer it
  replaced, with placeholder weights, ready for ``load_state_dict``;
- ``form.unpack()``: the same computation as plain torch layers (sharing the parameters),
  carrying ``rankwise_spec = form.spec()`` so that the unpacked form is still described.

:func:`form_types` finds every form by its class name (subclasses of :class:`CompressedForm`
register themselves by being defined), :func:`compressed_forms` lists the forms of a model,
packed or unpacked, and :func:`unpack_forms` unpacks them all.

Widths changed in place (by :class:`~rankwise.WidthEvolver`) are not forms but plain layers
of other sizes; :func:`shape_spec` records them timm-style, ``{name: {"type": "Conv2d",
"in_channels": 3, "out_channels": 12}}``, and :func:`resize_to` gives a model those sizes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

SPEC_ATTRIBUTE = "rankwise_spec"
"""The attribute an unpacked form carries: the spec of the form it was unpacked from."""

SIZE_ATTRIBUTES = {nn.Linear: ("in_features", "out_features"),
                   nn.modules.conv._ConvNd: ("in_channels", "out_channels"),
                   nn.modules.batchnorm._BatchNorm: ("num_features",)}
"""The attributes holding the sizes of the layers whose width can change."""


class CompressedForm:
    """The protocol of a module that replaced a dense layer (mixed into an ``nn.Module``)."""

    def spec(self) -> dict:
        """A plain description of the structure: ``{"type": <class name>, ...}`` (JSON-friendly)."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, layer: nn.Module, spec: dict) -> nn.Module:
        """A module with the structure in ``spec`` for the dense ``layer`` it replaced.

        Its weights are placeholders: load the saved state dict into it.
        """
        raise NotImplementedError

    def unpack(self) -> nn.Module:
        """The same computation as plain torch layers, carrying ``rankwise_spec``."""
        raise NotImplementedError

    @classmethod
    def check_spec_type(cls, spec: dict) -> None:
        """Raise a ``ValueError`` naming ``spec`` when it describes another form."""
        if spec.get("type") != cls.__name__:
            raise ValueError(f"spec: describes a {spec.get('type')!r}, not a {cls.__name__}.")


def form_types() -> dict[str, type]:
    """The registry: spec ``"type"`` -> :class:`CompressedForm` subclass, every one defined so far.

    A new form plugs into :func:`rankwise.save` / :func:`rankwise.load` by subclassing
    :class:`CompressedForm` (and being imported).
    """
    types, pending = {}, [CompressedForm]
    while pending:
        for subclass in pending.pop().__subclasses__():
            types[subclass.__name__] = subclass
            pending.append(subclass)
    return types


def form_spec(module: nn.Module) -> dict | None:
    """``{**spec, "unpacked": bool}`` of a form or an unpacked form; ``None`` for other modules."""
    if isinstance(module, CompressedForm):
        return {**module.spec(), "unpacked": False}
    spec = getattr(module, SPEC_ATTRIBUTE, None)
    return {**spec, "unpacked": True} if isinstance(spec, dict) else None


def outermost(model: nn.Module, is_whole):
    """``(name, module, whole)`` for every module of ``model`` that is not a part of a *whole*,
    in model order: ``whole = is_whole(module)``, and the submodules of a whole are skipped."""
    inside = set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        whole = is_whole(module)
        if whole:
            inside.update(id(m) for m in module.modules())
        yield name, module, whole


def compressed_forms(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost forms of ``model`` (packed or unpacked) by qualified name, in model order."""
    return {name: module for name, module, whole in outermost(model, lambda m: form_spec(m) is not None)
            if whole}


def unpack_forms(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with every compressed form replaced by its plain torch
    layers (:meth:`CompressedForm.unpack`); the model itself unpacked when it is a form. The public
    name is :func:`rankwise.unpack_projected_layers`."""
    unpacked = model if inplace else copy.deepcopy(model)
    for name, form in compressed_forms(unpacked).items():
        if isinstance(form, CompressedForm):
            if name == "":
                return form.unpack()
            unpacked.set_submodule(name, form.unpack())
    return fused_paths_off(unpacked)


FUSED_PATH_SWITCHES = {nn.TransformerEncoderLayer: "activation_relu_or_gelu",
                       nn.TransformerEncoder: "use_nested_tensor"}
"""The attribute that lets each of torch's transformer modules take its fused fast path."""


def fused_paths_off(model: nn.Module) -> nn.Module:
    """Keep torch's transformer modules that hold a compressed form off their fused paths, in place.

    In eval mode an ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder``'s nested-tensor
    path) runs one fused kernel on its children's weights (``linear1.weight``,
    ``self_attn.in_proj_weight``, ...) instead of calling them, which a compressed child does not
    have. Setting the attribute of :data:`FUSED_PATH_SWITCHES` to ``False`` (torch reads it only
    to decide on the fused path) makes the module call its children: the same outputs. Returns
    ``model``.
    """
    for module in model.modules():
        switch = next((name for kind, name in FUSED_PATH_SWITCHES.items() if isinstance(module, kind)), None)
        if switch is not None and compressed_forms(module):
            setattr(module, switch, False)
    return model


def size_attributes(module: nn.Module) -> tuple[str, ...]:
    """The size attributes of ``module`` (see :data:`SIZE_ATTRIBUTES`); empty for other layers."""
    return next((names for kind, names in SIZE_ATTRIBUTES.items() if isinstance(module, kind)), ())


def shape_spec(model: nn.Module) -> dict[str, dict]:
    """The sizes of the resizable layers of ``model``, by qualified name, read from the layers.

    ``{"conv1": {"type": "Conv2d", "in_channels": 3, "out_channels": 12}, "bn1": {"type":
    "BatchNorm2d", "num_features": 12}, ...}``: every Linear, convolution and BatchNorm outside
    the compressed forms, and for each form made of such layers (projected Linear / conv,
    truncated conv, packed or unpacked) the sizes of the dense layer it replaced (the inputs of
    its first layer, the outputs of its last). A model whose widths changed in place (by
    :class:`~rankwise.WidthEvolver`, or by hand keeping attributes and parameters in step) is
    described without knowing how it changed.
    """
    forms = compressed_forms(model)
    inside = {id(m) for form in forms.values() for m in form.modules()}
    shapes = {name: _sizes(module, module, module) for name, module in model.named_modules()
              if id(module) not in inside and size_attributes(module)}
    for name, form in forms.items():
        layers = list(form.children())
        family = size_attributes(layers[0]) if layers and not _own_parameters(form) else ()
        if family and all(size_attributes(layer) == family for layer in layers):
            shapes[name] = _sizes(layers[0], layers[0], layers[-1])
    return {name: shapes[name] for name in dict(model.named_modules()) if name in shapes}


def _own_parameters(module: nn.Module) -> bool:
    """Whether ``module`` holds parameters itself (an unpacked attention does: it is not made of
    its children alone)."""
    return next(module.parameters(recurse=False), None) is not None


def _sizes(kind: nn.Module, first: nn.Module, last: nn.Module) -> dict:
    """``{"type": ..., <input size>: of first, <output size>: of last}`` (one size for a BatchNorm)."""
    attributes = size_attributes(kind)
    return {"type": type(kind).__name__, attributes[0]: getattr(first, attributes[0]),
            **{attribute: getattr(last, attribute) for attribute in attributes[1:]}}


def resize_to(model: nn.Module, shapes: dict[str, dict]) -> None:
    """Give the layers of ``model`` (parameters on ``meta``) the sizes in ``shapes``, in place.

    A resized layer's parameters and buffers become ``meta`` tensors of the shapes its new
    sizes imply (:func:`tensor_shapes`), ready for ``load_state_dict(..., assign=True)`` or
    for a form's ``from_spec``.

    Parameters
    ----------
    model : torch.nn.Module
        A weightless skeleton (see :func:`rankwise.io.load`).
    shapes : dict
        A :func:`shape_spec`; layers already of those sizes are left alone.

    Raises
    ------
    ValueError
        Naming ``model`` when it lacks a layer of ``shapes`` or has one of another type.
    """
    for name, sizes in shapes.items():
        layer = original_layer(model, name, f"a {sizes['type']}", sizes["type"])
        if all(getattr(layer, a) == v for a, v in sizes.items() if a != "type"):
            continue
        for attribute, value in sizes.items():
            if attribute != "type":
                setattr(layer, attribute, value)
        expected = tensor_shapes(layer)
        for key, tensor in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]:
            if key in expected and tuple(tensor.shape) != expected[key]:
                resized = torch.empty(expected[key], dtype=tensor.dtype, device="meta")
                setattr(layer, key, nn.Parameter(resized, tensor.requires_grad)
                        if isinstance(tensor, nn.Parameter) else resized)


def tensor_shapes(layer: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shapes of a Linear's, convolution's or BatchNorm's tensors implied by its size attributes.

    Linear: ``weight (out, in)``; convolution: ``weight (out, in / groups, *kernel)``
    (transposed: ``(in, out / groups, *kernel)``); both ``bias (out,)``; BatchNorm: ``(C,)`` for
    ``weight``, ``bias``, ``running_mean`` and ``running_var``.
    """
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return dict.fromkeys(("weight", "bias", "running_mean", "running_var"), (layer.num_features,))
    inputs, outputs = (getattr(layer, a) for a in size_attributes(layer))
    if isinstance(layer, nn.Linear):
        return {"weight": (outputs, inputs), "bias": (outputs,)}
    kernel = tuple(layer.kernel_size)
    weight = ((inputs, outputs // layer.groups) if layer.transposed else (outputs, inputs // layer.groups))
    return {"weight": (*weight, *kernel), "bias": (outputs,)}


def original_layer(model: nn.Module, name: str, held: str, kind: str | None = None) -> nn.Module:
    """Layer ``name`` of ``model``, the original architecture given to :func:`rankwise.load`.

    Raises a ``ValueError`` naming ``model`` when it has no such layer, when the layer is
    already a compressed form, or (with ``kind``) when it is not of type ``kind``; ``held``
    says what the file holds there (e.g. ``"a ProjectedConv"``).
    """
    advice = "Pass the architecture the saved model was compressed or resized from."
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"model: it has no layer {name!r}, where the file holds {held}. {advice}") from None
    if form_spec(layer) is not None:
        raise ValueError(f"model: its layer {name!r} is already compressed ({type(layer).__name__})."
                         " Pass the uncompressed architecture (or load without model=).")
    if kind is not None and type(layer).__name__ != kind:
        raise ValueError(f"model: its layer {name!r} is a {type(layer).__name__}, where the file "
                         f"holds {held}. {advice}")
    return layer
