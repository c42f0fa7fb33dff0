"""Which convolutions of a model can have their kernels truncated, found by names or patterns.

The selection is the one of :mod:`rankwise.targets` over the truncatable convolutions: the
ungrouped torch convolutions whose kernels have named legs (:data:`rankwise.decompose.legs.SPATIAL_LEGS`)
that are not, and are not inside, a compressed form (:func:`rankwise.forms.compressed_parts`).
"""

from __future__ import annotations

from torch import nn

from rankwise.decompose.legs import SPATIAL_LEGS
from rankwise.forms import compressed_parts, describe_form, is_form
from rankwise.kinds import CONVOLUTIONS, convolution_dims
from rankwise.targets import SelectableLayers, select

SUPPORTED = ", ".join(CONVOLUTIONS[dims].__name__ for dims in SPATIAL_LEGS)
"""The truncatable torch types, for messages."""


def why_not_truncatable(module: nn.Module) -> str | None:
    """The reason ``module``'s kernel cannot be truncated, or ``None`` when it can."""
    if is_form(module):
        return f"it is already compressed ({describe_form(module)})"
    if convolution_dims(module) not in SPATIAL_LEGS:
        return f"{type(module).__name__} layers are not supported (supported: {SUPPORTED})"
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "it is a lazy layer that has not been initialised yet (run one forward pass first)"
    if module.groups != 1:
        return f"it is a grouped convolution (groups={module.groups}); grouped kernels stay dense"
    return None


def truncatable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every truncatable convolution of ``model`` by qualified name, in model order.

    Convolutions that are part of a compressed form (a :class:`~rankwise.decompose.TruncatedConv`,
    a projected convolution's core, ...) are not listed.
    """
    parts = compressed_parts(model)
    return {name: module for name, module in model.named_modules()
            if name not in parts and why_not_truncatable(module) is None}


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
        given, a layer inside a compressed form included); naming ``model`` when it has no
        truncatable layer.
    """
    candidates = SelectableLayers(truncatable_layers(model), why_not_truncatable, "truncated",
                                  "Truncatable layers",
                                  f"model: it has no convolution whose kernel can be truncated ({SUPPORTED} "
                                  "with groups=1, outside the compressed forms).")
    return select(model, candidates, layer_names, exclude, argument)
