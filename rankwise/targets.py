"""Which layers of a model can be projected, found by their qualified names.

Layer replacement is driven by names, as in peft: ``layer_names`` lists qualified module
names (``"features.0"``, ``"classifier"``); ``None`` means every projectable layer.
"""

from __future__ import annotations

from torch import nn

from rankwise.kinds import kind_of, supported_names
from rankwise.layers.base import ProjectedLayer

def layer_kind(module: nn.Module) -> str:
    """Short name of a projectable layer type: ``"linear"``, ``"conv1d"``, ..., ``"lstm"``, ``"gru"``."""
    return kind_of(module).name


def why_not_projectable(module: nn.Module) -> str | None:
    """The reason ``module`` cannot be projected, or ``None`` when it can (see :mod:`rankwise.kinds`).

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    str or None
    """
    if isinstance(module, ProjectedLayer):
        return "it is already projected"
    kind = kind_of(module)
    if kind is None:
        return f"{type(module).__name__} layers are not supported (supported: {supported_names()})"
    return kind.refusal(module)


def projectable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every projectable layer of ``model``, by qualified name, in model order.

    Layers inside an existing :class:`ProjectedLayer` are not listed.
    """
    inside_projected = set()
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, ProjectedLayer):
            inside_projected.update(id(m) for m in module.modules())
        if id(module) not in inside_projected and why_not_projectable(module) is None:
            layers[name] = module
    return layers


def select_layers(model: nn.Module, layer_names=None, exclude=None) -> dict[str, nn.Module]:
    """The layers named by ``layer_names`` (all projectable layers when ``None``), less ``exclude``.

    Parameters
    ----------
    model : torch.nn.Module
    layer_names : str or iterable of str, optional
        Qualified module names as given by ``model.named_modules()``.
    exclude : str or iterable of str, optional
        Qualified names of layers to leave out of the selection.

    Returns
    -------
    dict of str to torch.nn.Module
        In model order.

    Raises
    ------
    ValueError
        When a name does not exist (the valid names are listed), is not projectable (the
        reason is given), or when no layer is left to project.
    """
    selected = _named_layers(model, layer_names)
    if exclude is None:
        return selected
    excluded = [exclude] if isinstance(exclude, str) else list(exclude)
    modules = dict(model.named_modules())
    unknown = [name for name in excluded if name not in modules]
    if unknown:
        raise ValueError(f"exclude: {', '.join(map(repr, unknown))} is not a layer of the model. "
                         f"Projectable layers: {', '.join(projectable_layers(model)) or 'none'}.")
    kept = {name: module for name, module in selected.items() if name not in set(excluded)}
    if not kept:
        raise ValueError(f"exclude: it leaves no layer to project (selected: {', '.join(selected)}); "
                         "exclude fewer layers.")
    return kept


def _named_layers(model: nn.Module, layer_names) -> dict[str, nn.Module]:
    """:func:`select_layers` without ``exclude``."""
    available = projectable_layers(model)
    if layer_names is None:
        if not available:
            raise ValueError(f"model: it has no projectable layer ({supported_names()}).")
        return available
    requested = [layer_names] if isinstance(layer_names, str) else list(layer_names)
    if not requested:
        raise ValueError("layer_names: the list is empty; pass None to project every layer.")
    modules = dict(model.named_modules())
    for name in requested:
        if name not in modules:
            raise ValueError(f"layer_names: {name!r} is not a layer of the model. "
                             f"Projectable layers: {', '.join(available) or 'none'}.")
        reason = why_not_projectable(modules[name]) if name not in available else None
        if name not in available:
            raise ValueError(f"layer_names: {name!r} cannot be projected: "
                             f"{reason or 'it lies inside a projected layer'}.")
    wanted = set(requested)
    return {name: module for name, module in available.items() if name in wanted}
