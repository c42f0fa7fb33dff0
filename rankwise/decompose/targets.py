"""Which convolutions of a model can have their kernels truncated, found by names or patterns.

The selection is the one of :mod:`rankwise.targets` over the truncatable convolutions.
"""

from __future__ import annotations

from torch import nn

from rankwise.decompose.execution import TruncatedConv
from rankwise.decompose.legs import CONV_LEGS
from rankwise.targets import Candidates, select


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


def select_kernels(model: nn.Module, layer_names=None, exclude=None,
                   argument: str = "layer_names") -> dict[str, nn.Module]:
    """The convolutions named by ``layer_names`` (every truncatable one when ``None``), less
    those named by ``exclude``, in model order.

    Names and patterns are those of :func:`rankwise.targets.select_layers`.

    Raises
    ------
    ValueError
        Naming ``argument`` (where the names came from) or ``exclude``, when an entry matches no
        truncatable layer (they are listed) or names one that cannot be truncated (the reason is
        given); naming ``model`` when it has no truncatable layer.
    """
    candidates = Candidates(truncatable_layers(model), why_not_truncatable, "truncated",
                            "Truncatable layers", "it lies inside a truncated layer",
                            "model: it has no convolution whose kernel can be truncated "
                            "(Conv1d or Conv2d with groups=1).")
    return select(model, candidates, layer_names, exclude, argument)
