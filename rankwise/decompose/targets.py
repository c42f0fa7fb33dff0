"""Which convolutions of a model can have their kernels truncated, found by qualified name."""

from __future__ import annotations

from torch import nn

from rankwise.decompose.execution import TruncatedConv
from rankwise.decompose.legs import CONV_LEGS


def why_not_truncatable(module: nn.Module) -> str | None:
    """The reason ``module``'s kernel cannot be truncated, or ``None`` when it can."""
    if not isinstance(module, tuple(CONV_LEGS)):
        return f"{type(module).__name__} layers are not supported (supported: Conv1d, Conv2d)"
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "it is a lazy layer that has not been initialised yet (run one forward pass first)"
    if module.groups != 1:
        return f"it is a grouped convolution (groups={module.groups}); grouped kernels stay dense"
    return None


def truncatable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every truncatable convolution of ``model`` by qualified name, in model order.

    Convolutions inside a :class:`TruncatedConv` (already truncated) are not listed.
    """
    inside = {id(m) for module in model.modules() if isinstance(module, TruncatedConv)
              for m in module.modules()}
    return {name: module for name, module in model.named_modules()
            if id(module) not in inside and why_not_truncatable(module) is None}


def select_kernels(model: nn.Module, layer_names=None, argument: str = "layer_names") -> dict[str, nn.Module]:
    """The convolutions named by ``layer_names`` (every truncatable one when ``None``), in model order.

    Raises
    ------
    ValueError
        Naming ``argument`` (where the names came from), when a name does not exist (the valid
        names are listed) or names a layer that cannot be truncated (the reason is given); naming
        ``model`` when it has no truncatable layer.
    """
    available = truncatable_layers(model)
    if layer_names is None:
        if not available:
            raise ValueError("model: it has no convolution whose kernel can be truncated "
                             "(Conv1d or Conv2d with groups=1).")
        return available
    requested = [layer_names] if isinstance(layer_names, str) else list(layer_names)
    if not requested:
        raise ValueError(f"{argument}: no layer named; pass None to truncate every convolution.")
    modules = dict(model.named_modules())
    for name in requested:
        if name not in modules:
            raise ValueError(f"{argument}: {name!r} is not a layer of the model. Truncatable "
                             f"layers: {', '.join(available) or 'none'}.")
        if name not in available:
            reason = why_not_truncatable(modules[name]) or "it lies inside a truncated layer"
            raise ValueError(f"{argument}: {name!r} cannot be truncated: {reason}.")
    return {name: module for name, module in available.items() if name in set(requested)}
