"""The protocol every compressed form answers, and the shape spec of resized layers.

A *compressed form* is a module that replaced one dense layer: a projected wrapper
(:class:`~rankwise.layers.ProjectedLayer`, the recurrent ones included) or a truncated
convolution (:class:`~rankwise.decompose.TruncatedConv`). Each answers three calls:

- ``form.spec()``: a plain, JSON-friendly dict, ``{"type": <class name>, ...}``, describing
  the structure (ranks, method, ...) but no weight;
- ``Form.from_spec(dense_layer, spec)``: a module of that structure for the dense layer it
  replaced, with placeholder weights, ready for ``load_state_dict``;
- ``form.unpack()``: the same computation as plain torch layers (sharing the parameters),
  carrying ``rankwise_spec = form.spec()`` so that the unpacked form is still described;
- ``form.dense()``: plain torch layers computing the same outputs, for an exporter (the
  unpacked layers, or where no plain layers compute the form factored, its dense layer).

:func:`form_types` finds every form by its class name (subclasses of :class:`CompressedForm`
register themselves by being defined), :func:`compressed_forms` lists the forms of a model,
packed or unpacked, :func:`compressed_parts` is the one answer to "is this module, or is it
inside, a compressed form?" (every selector, the report and export ask it), and
:func:`unpack_forms` and :func:`dense_forms` replace them all.

Widths changed in place (by :class:`~rankwise.WidthEvolver`) are not forms but plain layers
of other sizes; :func:`shape_spec` records them timm-style, ``{name: {"type": "Conv2d",
"in_channels": 3, "out_channels": 12}}``, and :func:`resize_to` gives a model those sizes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rankwise.kinds import BATCHNORM_TENSORS, fused_path_switch, is_batchnorm, kind_of, size_attributes

SPEC_ATTRIBUTE = "rankwise_spec"
"""The attribute an unpacked form carries: the spec of the form it was unpacked from."""


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
        """The same computation as plain torch layers, carrying ``rankwise_spec``; the form itself
        where no plain torch layers compute it factored (the projected recurrence), which then
        gives its dense layer as ``to_dense()``."""
        raise NotImplementedError

    def dense(self) -> nn.Module:
        """Plain torch layers computing the same outputs, for an exporter: :meth:`unpack`'s, or
        the dense layer with the rebuilt weights (``to_dense()``) of a form that unpacks to itself."""
        unpacked = self.unpack()
        return self.to_dense() if unpacked is self else unpacked

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


def is_form(module: nn.Module) -> bool:
    """Whether ``module`` is a compressed form, packed or unpacked (it has a :func:`form_spec`)."""
    return form_spec(module) is not None


def describe_form(module: nn.Module) -> str:
    """``"ProjectedConv"``, or ``"unpacked ProjectedConv"`` for the plain layers of an unpacked one."""
    spec = form_spec(module)
    return f"{'unpacked ' if spec['unpacked'] else ''}{spec['type']}"


def compressed_forms(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost forms of ``model`` (packed or unpacked) by qualified name, in model order."""
    return {name: module for name, module, whole in outermost(model, is_form) if whole}


def compressed_parts(model: nn.Module) -> dict[str, str]:
    """``{module: form}``: every module of ``model`` that is, or is inside, a compressed form
    (packed or unpacked), by qualified name, with the qualified name of that outermost form.

    The one answer to "is this module already compressed, or part of something compressed?":
    a layer inside a form is not a dense layer of the model (projecting or truncating it would
    nest forms, which :func:`rankwise.save` cannot describe), so every selector leaves these out.
    """
    return {_child(name, part): name for name, form in compressed_forms(model).items()
            for part, _ in form.named_modules()}


def _child(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent and child else parent or child


def unpack_forms(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with every compressed form replaced by its plain torch
    layers (:meth:`CompressedForm.unpack`); the model itself unpacked when it is a form. The public
    name is :func:`rankwise.unpack_projected_layers`."""
    return _replace_forms(model, inplace, lambda form: form.unpack())


def dense_forms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every compressed form replaced by :meth:`CompressedForm.dense`:
    plain torch layers only, for an exporter."""
    return _replace_forms(model, False, lambda form: form.dense())


def _replace_forms(model: nn.Module, inplace: bool, replacement) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with every packed form replaced by ``replacement(form)``."""
    replaced = model if inplace else copy.deepcopy(model)
    for name, form in compressed_forms(replaced).items():
        if isinstance(form, CompressedForm):
            if name == "":
                return replacement(form)
            replaced.set_submodule(name, replacement(form))
    return fused_paths_off(replaced)


def fused_paths_off(model: nn.Module) -> nn.Module:
    """Keep torch's transformer modules that hold a compressed form off their fused paths, in place.

    In eval mode an ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder``'s nested-tensor
    path) runs one fused kernel on its children's weights (``linear1.weight``,
    ``self_attn.in_proj_weight``, ...) instead of calling them, which a compressed child does not
    have. Setting the attribute of :data:`rankwise.kinds.FUSED_PATH_SWITCHES` to ``False`` (torch
    reads it only to decide on the fused path) makes the module call its children: the same
    outputs. Returns ``model``.
    """
    for module in model.modules():
        switch = fused_path_switch(module)
        if switch is not None and compressed_forms(module):
            setattr(module, switch, False)
    return model


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
    parts = compressed_parts(model)
    shapes = {name: _sizes(module, module, module) for name, module in model.named_modules()
              if name not in parts and size_attributes(module)}
    for name, form in compressed_forms(model).items():
        layers = list(form.children())
        sizes = size_attributes(layers[0]) if layers and not _own_parameters(form) else ()
        if sizes and all(size_attributes(layer) == sizes for layer in layers):
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


def resize_to(model: nn.Module, shapes: dict[str, dict], forms=()) -> None:
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
    forms : collection of str
        The names where the file holds compressed forms. Their entries give the sizes of the
        form's parts; a layer there of a kind without size attributes (which no width change
        touches, such as a type of :func:`rankwise.register_kind`) was never resized, and is
        left alone.

    Raises
    ------
    ValueError
        Naming ``model`` when it lacks a layer of ``shapes`` or has one of another type.
    """
    for name, sizes in shapes.items():
        held = f"a {sizes['type']}"
        if name in forms and _never_resized(original_layer(model, name, held)):
            continue
        layer = original_layer(model, name, held, sizes["type"])
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


def _never_resized(layer: nn.Module) -> bool:
    """Whether ``layer`` is of a kind without size attributes, whose width nothing changes in place."""
    return kind_of(layer) is not None and not size_attributes(layer)


def tensor_shapes(layer: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shapes of a resizable layer's tensors implied by its size attributes (:func:`size_attributes`).

    A Linear or convolution: ``weight (out, in / groups, *kernel)`` (no kernel for a Linear) and
    ``bias (out,)``; a BatchNorm: ``(C,)`` for each of
    :data:`~rankwise.kinds.BATCHNORM_TENSORS`.
    """
    if is_batchnorm(layer):
        return dict.fromkeys(BATCHNORM_TENSORS, (layer.num_features,))
    inputs, outputs = (getattr(layer, a) for a in size_attributes(layer))
    kernel = tuple(layer.weight.shape[2:])
    return {"weight": (outputs, inputs // getattr(layer, "groups", 1), *kernel), "bias": (outputs,)}


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
