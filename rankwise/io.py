"""save and load: compressed models as safetensors weights plus a plain JSON spec.

A file written by :func:`save` is one safetensors file:

- its tensors are the model's ``state_dict``; a tensor that an earlier key already holds
  (tied weights) is stored once and named in the spec's ``aliases``;
- its metadata ``"rankwise"`` is the *spec*, plain JSON saying what was replaced by what::

      {"format": "rankwise-model", "format_version": 2, "rankwise_version": "0.1.0",
       "learnables": 81290, "training": false, "training_differs": [],
       "layers": {"7": {"type": "ProjectedLinear", "rank_in": null, "rank_out": 24,
                        "unpacked": false},
                  "3": {"type": "TruncatedConv", "method": "tt", "ranks": [2, 3], ...}, ...},
       "shapes": {"0": {"type": "Conv2d", "in_channels": 3, "out_channels": 12}, ...},
       "aliases": {"head.weight": "embed.weight"},
       "projection": {...}}        # the ProjectionInfo given to save, or null

  Each entry of ``layers`` is the ``spec()`` of a compressed form (:mod:`rankwise.forms`:
  projected, recurrent or truncated), packed or unpacked (``"unpacked": true``: the plain
  layers its ``unpack()`` returned). ``shapes`` is :func:`rankwise.forms.shape_spec`: the
  sizes of the resizable plain layers (Linear, convolutions, BatchNorm), so that widths
  changed in place (by :class:`~rankwise.WidthEvolver`) are rebuilt too. Version 1 files,
  written before ``shapes`` existed, are read as having none. ``training`` is the saved
  model's mode (``model.training``) and ``training_differs`` the modules whose mode is the
  other one; files written before these keys existed record no mode;
- only with ``save(..., include_architecture=True)``, its metadata ``"rankwise_architecture"``
  is the model's structure without its weights (parameters on the ``meta`` device), pickled by
  ``torch.save`` and base64-encoded: a fallback for loading without the original code.

:func:`load` with ``model``, the original uncompressed architecture, rebuilds the structure
from the spec alone: the plain layers are given the recorded sizes, then each named layer is
replaced by ``form_types()[type].from_spec(layer, spec)`` (unpacked where the spec says so), and
the weights are read: nothing is unpickled, whatever the file holds. Without ``model`` the
stored architecture is unpickled only with ``trust_pickle=True``: unpickling runs code from the
file (as ``torch.load(weights_only=False)`` does), which nobody expects of a ``.safetensors``
file, so by default such a file is refused (as torch refuses since 2.6, ``weights_only=True``).
Either way the weights are the stored tensors themselves, so the round trip is bit-exact, and
the model comes back in the mode it was saved in.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import io
import json

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from rankwise._version import __version__
from rankwise.forms import (compressed_forms, form_spec, form_types, fused_paths_off, original_layer, resize_to,
                            shape_spec)
from rankwise.learnables import count_learnables
from rankwise.projection import LayerProjection, ProjectionInfo
from rankwise.goals import Goal
from rankwise.selection import MeasuredChoice

FORMAT = "rankwise-model"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SPEC_KEY = "rankwise"
ARCHITECTURE_KEY = "rankwise_architecture"


def model_spec(model: nn.Module) -> dict[str, dict]:
    """The compressed forms of ``model`` by qualified name: their spec and whether unpacked."""
    return {name: form_spec(form) for name, form in compressed_forms(model).items()}


def save(model: nn.Module, path, *, info: ProjectionInfo | None = None,
         include_architecture: bool = False, metadata: dict[str, str] | None = None) -> None:
    """Write ``model`` (compressed or not) to ``path`` as safetensors weights plus a spec.

    Parameters
    ----------
    model : torch.nn.Module
        Not modified.
    path : str or os.PathLike
        The file to write (by convention ``*.safetensors``).
    info : ProjectionInfo, optional
        What :func:`~rankwise.compress_network_using_projection` reported; kept in the spec
        for ``rankwise info`` (the spec describes every form without it).
    include_architecture : bool
        Also store the weightless structure as a pickle, so that ``load(path,
        trust_pickle=True)`` works without the original architecture. Off by default: loading
        a pickle runs code, so :func:`load` refuses it unless told to trust it, and
        ``load(path, model=original)`` needs no pickle.
    metadata : dict of str to str, optional
        More entries for the file's metadata, read back with :func:`read_metadata` (the command
        line keeps a Hugging Face model's config there, :mod:`rankwise.hf`). Their keys must not
        be rankwise's own (``"rankwise"``, ``"rankwise_architecture"``).
    """
    if info is not None and not isinstance(info, ProjectionInfo):
        raise ValueError(f"info: expected the ProjectionInfo of compress_network_using_projection "
                         f"or None, got {type(info).__name__}; the spec describes every compressed "
                         "form without it.")
    tensors, aliases = _unique_tensors(model.state_dict())
    spec = {"format": FORMAT, "format_version": FORMAT_VERSION, "rankwise_version": __version__,
            "learnables": count_learnables(model), **mode_spec(model), "layers": model_spec(model),
            "shapes": shape_spec(model), "aliases": aliases,
            "projection": None if info is None else dataclasses.asdict(info)}
    extra = _checked_metadata(metadata)
    metadata = {**extra, SPEC_KEY: json.dumps(spec)}
    if include_architecture:
        metadata[ARCHITECTURE_KEY] = _pickled_skeleton(model)
    save_file(tensors, path, metadata=metadata)


def _checked_metadata(metadata: dict | None) -> dict[str, str]:
    metadata = metadata or {}
    reserved = {SPEC_KEY, ARCHITECTURE_KEY} & set(metadata)
    if reserved or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"metadata: expected a dict of str to str whose keys are not rankwise's own "
                         f"({SPEC_KEY!r}, {ARCHITECTURE_KEY!r}); got keys {sorted(map(str, metadata))}.")
    return metadata


def load(path, model: nn.Module | None = None, *, trust_pickle: bool = False) -> nn.Module:
    """Read a model written by :func:`save`.

    Parameters
    ----------
    path : str or os.PathLike
    model : torch.nn.Module, optional
        The original, uncompressed architecture the saved model was compressed (or resized)
        from (its weights do not matter). It is not modified. Nothing is unpickled.
    trust_pickle : bool
        Only when ``model`` is ``None``: unpickle the architecture the file stores
        (``save(..., include_architecture=True)``). Unpickling runs code from the file: pass
        ``True`` only for files you trust. Without it, such a file is refused.

    Returns
    -------
    torch.nn.Module
        On the CPU, with the stored tensors, dtypes included, in the mode (training or eval,
        module by module) it was saved in. Files written before rankwise recorded the mode
        keep the mode of ``model`` (of the unpickled structure without it, which is the saved one).

    Raises
    ------
    ValueError
        When ``path`` is not a rankwise file, ``model`` does not match it, or ``model`` is
        ``None`` and the file stores no architecture or ``trust_pickle`` is not set.
    """
    metadata = _metadata(path)
    spec = _spec(metadata, path)
    if model is not None:
        skeleton = _skeleton(model)
        resize_to(skeleton, spec["shapes"], forms=spec["layers"])
        skeleton = _rebuild(skeleton, spec["layers"])
    else:
        skeleton = _unpickled_skeleton(metadata, path, trust_pickle)
    state = load_file(path)
    state.update({alias: state[key] for alias, key in spec["aliases"].items()})
    try:
        skeleton.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"model: it does not match the file {str(path)!r} "
                         f"({_gist(error)}). Pass the architecture the saved model was "
                         "compressed from.") from None
    _retie(skeleton, spec["aliases"])
    _set_mode(skeleton, spec)
    return skeleton


def _retie(model: nn.Module, aliases: dict) -> None:
    """Make each aliased parameter the very parameter it aliases again, as in the saved model
    (``load_state_dict(assign=True)`` wraps every key in a parameter of its own, which would
    untie a language model's head from its token embedding and count the table twice)."""
    for alias, key in aliases.items():
        (owner, name), (source_owner, source) = (_parameter_path(model, path) for path in (alias, key))
        if name in owner._parameters and source in source_owner._parameters:
            setattr(owner, name, source_owner._parameters[source])


def _parameter_path(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    """``(module, attribute)`` holding the state-dict entry ``key``."""
    module, _, name = key.rpartition(".")
    return model.get_submodule(module), name


def mode_spec(model: nn.Module) -> dict:
    """``{"training": model.training, "training_differs": [names of the modules in the other
    mode]}``: the mode of every module, root first."""
    return {"training": model.training,
            "training_differs": [name for name, module in model.named_modules()
                                 if module.training != model.training]}


def _set_mode(model: nn.Module, spec: dict) -> None:
    """Put every module of ``model`` in the mode :func:`mode_spec` recorded (files without
    a recorded mode are left as they are)."""
    if "training" not in spec:
        return
    model.train(spec["training"])
    for name in spec["training_differs"]:
        model.get_submodule(name).training = not spec["training"]


def read_spec(path) -> dict:
    """The spec stored in a file written by :func:`save` (see the module docstring), in the
    current format (a version-1 spec gets empty ``shapes``)."""
    return _spec(_metadata(path), path)


def _spec(metadata: dict, path) -> dict:
    if SPEC_KEY not in metadata:
        raise ValueError(f"path: {str(path)!r} is a safetensors file but not one written by "
                         "rankwise.save (no rankwise spec in it).")
    spec = json.loads(metadata[SPEC_KEY])
    if spec.get("format") != FORMAT or spec.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"path: {str(path)!r} holds a rankwise spec of format "
                         f"{spec.get('format')!r} version {spec.get('format_version')!r}; this "
                         f"rankwise reads {FORMAT!r} versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}.")
    return {"shapes": {}, **spec}


def is_rankwise_file(path) -> bool:
    """Whether ``path`` is a readable file written by :func:`save`."""
    try:
        return SPEC_KEY in _metadata(path)
    except (OSError, ValueError):
        return False


def stored_tensors(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{key: (dtype, shape)}`` of the tensors stored in a safetensors file."""
    with safe_open(path, framework="pt") as stream:
        return {key: (stream.get_slice(key).get_dtype(), tuple(stream.get_slice(key).get_shape()))
                for key in stream.keys()}


def has_architecture(path) -> bool:
    """Whether the file stores the pickled architecture (``load(path, trust_pickle=True)``
    works without ``model``)."""
    return ARCHITECTURE_KEY in _metadata(path)


def projection_info(spec: dict) -> ProjectionInfo | None:
    """The :class:`ProjectionInfo` kept in a spec by ``save(..., info=...)``, if any."""
    stored = spec.get("projection")
    if stored is None:
        return None
    layers = {name: LayerProjection(**layer) for name, layer in stored["layers"].items()}
    measured = stored.get("measured") and MeasuredChoice.from_dict(stored["measured"])
    return ProjectionInfo(**{**stored, "layers": layers, "measured": measured, "goal": Goal.from_stored(stored["goal"])})


def read_metadata(path) -> dict[str, str]:
    """The metadata of a safetensors file: rankwise's spec, and the entries given to
    ``save(..., metadata=...)``."""
    return _metadata(path)


def _metadata(path) -> dict:
    try:
        with safe_open(path, framework="pt") as stream:
            return stream.metadata() or {}
    except SafetensorError:
        raise ValueError(f"path: {str(path)!r} is not a safetensors file (no safetensors header); "
                         "give a file written by rankwise.save.") from None


def _unique_tensors(state: dict) -> tuple[dict, dict]:
    """``(tensors, aliases)``: each stored view once, on the CPU, contiguous; later keys of the
    same view become aliases; views overlapping a stored one otherwise are copied."""
    tensors, aliases, views, storages = {}, {}, {}, set()
    for key, tensor in state.items():
        tensor = tensor.detach()
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tensor.stride(), tensor.dtype, tensor.device)
        if tensor.numel() and view in views:
            aliases[key] = views[view]
            continue
        views[view] = key
        shares_storage = tensor.numel() and view[0] in storages
        storages.add(view[0])
        tensors[key] = (tensor.clone() if shares_storage else tensor).cpu().contiguous()
    return tensors, aliases


def _skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and persistent buffers are on ``meta``
    (no data copied); non-persistent buffers, which the state dict lacks, keep their data."""
    memo = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            memo[id(parameter)] = nn.Parameter(torch.empty_like(parameter, device="meta"),
                                               requires_grad=parameter.requires_grad)
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def _pickled_skeleton(model: nn.Module) -> str:
    buffer = io.BytesIO()
    try:
        torch.save(_skeleton(model), buffer)
    except Exception as error:
        raise ValueError(f"include_architecture: the model's structure cannot be pickled "
                         f"({type(error).__name__}: {error}); save it without include_architecture "
                         "and pass model= to rankwise.load.") from None
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _unpickled_skeleton(metadata: dict, path, trust_pickle: bool) -> nn.Module:
    """The stored architecture, unpickled only when the caller trusts the file."""
    if ARCHITECTURE_KEY not in metadata:
        raise ValueError(f"model: {str(path)!r} stores no architecture (saved without "
                         "include_architecture=True); pass model=, the uncompressed model it was "
                         "compressed from.")
    if not trust_pickle:
        raise ValueError(f"model: {str(path)!r} stores its architecture only as a pickle, and "
                         "unpickling runs code from the file; pass model=, the uncompressed model "
                         "it was compressed from (nothing is unpickled), or trust_pickle=True if "
                         "you trust the file.")
    data = io.BytesIO(base64.b64decode(metadata[ARCHITECTURE_KEY]))
    try:
        return torch.load(data, weights_only=False)
    except Exception as error:  # unpickling raises anything the file's code raises
        raise ValueError(f"path: the architecture stored in {str(path)!r} cannot be unpickled "
                         f"({unpickling_failure(error)}); pass model=, the uncompressed model it "
                         "was compressed from.") from None


def unpickling_failure(error: Exception) -> str:
    """What went wrong unpickling a model, and for a class that cannot be imported, how to fix it.

    A missing module is one the unpickler could not import; a class defined in the script that
    saved the model (``__main__``) exists only while that script runs.
    """
    if isinstance(error, ModuleNotFoundError):
        return (f"it needs the module {error.name!r}, which cannot be imported: run from the "
                "folder that holds it or add that folder to PYTHONPATH")
    if isinstance(error, AttributeError) and "__main__" in str(error):
        return (f"{_gist(error)}: the model's class was defined in the script that saved it; "
                "move the class into a module, import it from there and save again")
    return f"{type(error).__name__}: {_gist(error)}"


def _rebuild(skeleton: nn.Module, layers: dict) -> nn.Module:
    """``skeleton`` with each named dense layer replaced as the spec says."""
    registry = form_types()
    for name, spec in layers.items():
        dense = original_layer(skeleton, name, f"a {spec['type']}")
        if spec["type"] not in registry:
            raise ValueError(f"path: layer {name!r} is a {spec['type']!r}, which is not a known "
                             f"compressed form (known: {', '.join(registry)}); import the "
                             "module that defines it before loading.")
        try:
            replacement = registry[spec["type"]].from_spec(dense, spec)
        except (AttributeError, TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"model: its layer {name!r} ({type(dense).__name__}) cannot become the "
                             f"file's {spec['type']} ({_gist(error)}). Pass the architecture the saved "
                             "model was compressed from.") from None
        skeleton = _replaced(skeleton, name, replacement.unpack() if spec["unpacked"] else replacement)
    return fused_paths_off(skeleton)


def _replaced(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if name == "":
        return module
    root.set_submodule(name, module)
    return root


def _gist(error: Exception) -> str:
    """The first two non-empty lines of an error message, on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2])
