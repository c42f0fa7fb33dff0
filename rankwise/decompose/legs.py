"""The legs of a convolution kernel, and the strings that name cuts, leg orders and modes.

A ``Conv2d`` kernel ``W[o, i, h, w]`` has four legs, one letter each: ``o`` (output
channels), ``i`` (input channels), ``h`` (kernel rows) and ``w`` (kernel columns). A
``Conv1d`` kernel ``W[o, i, w]`` has three: its single spatial leg is called ``w``.

- A **cut** is a bipartition of the legs written ``"<legs>|<legs>"``, for example
  ``"o|ihw"``, ``"oh|iw"`` or ``"hw|oi"``. Both sides are sets: ``"ihw|o"``, ``"o|whi"`` and
  ``"o|ihw"`` are the same cut. A Conv2d kernel has seven cuts, a Conv1d kernel three.
- A **leg order** lists every leg once, for example ``"ihwo"``: the chain of a tensor train.
- **Modes** list some legs once each, for example ``"oi"``: the legs a Tucker decomposition
  compresses.
"""

from __future__ import annotations

import itertools

from torch import nn

CHANNEL_LEGS = "oi"
SPATIAL_LEGS = {1: "w", 2: "hw"}
"""The names of a kernel's spatial legs, by the number of spatial dimensions of the convolution
(the kernels whose legs are named here are the truncatable ones)."""


def kernel_legs(layer: nn.Module) -> str:
    """The legs of ``layer``'s kernel in the order of its weight's axes (``"oihw"`` or ``"oiw"``)."""
    return CHANNEL_LEGS + SPATIAL_LEGS[layer.weight.dim() - 2]


def spatial_legs(legs: str) -> str:
    """The spatial legs among ``legs``, in kernel order (``"hw"`` for ``"oihw"``)."""
    return "".join(leg for leg in legs if leg not in CHANNEL_LEGS)


def parse_cut(cut, legs: str) -> tuple[str, str]:
    """The two sides of ``cut``, each in kernel order, the side holding ``o`` first.

    Parameters
    ----------
    cut : str
        For example ``"o|ihw"``, ``"iw|oh"``.
    legs : str
        The kernel's legs, ``"oihw"`` or ``"oiw"``.

    Returns
    -------
    tuple of str
        ``(side with o, other side)``, e.g. ``("oh", "iw")`` for ``"iw|oh"``.

    Raises
    ------
    ValueError
        Unless ``cut`` splits ``legs`` into two non-empty sides, each leg named once.
    """
    sides = cut.split("|") if isinstance(cut, str) else []
    letters = "".join(sides)
    if len(sides) != 2 or not all(sides) or sorted(letters) != sorted(legs):
        raise ValueError(f"cut: {cut!r} is not a bipartition of the kernel legs {legs!r}. Write the "
                         "legs of one side, '|', then the others, each leg once, e.g. "
                         f"{', '.join(map(repr, bipartitions(legs)[:3]))}.")
    left, right = (_in_kernel_order(side, legs) for side in sides)
    return (left, right) if "o" in left else (right, left)


def bipartitions(legs: str) -> list[str]:
    """Every cut of ``legs`` in canonical form (the side with ``o`` first, kernel order).

    ``"oihw"`` gives ``o|ihw, oi|hw, oh|iw, ow|ih, oih|w, oiw|h, ohw|i``.
    """
    others = legs.replace("o", "")
    cuts = []
    for size in range(len(others)):
        for joined in itertools.combinations(others, size):
            left = _in_kernel_order("o" + "".join(joined), legs)
            cuts.append(left + "|" + "".join(leg for leg in legs if leg not in left))
    return cuts


def parse_order(order, legs: str) -> str:
    """``order`` checked to name every leg of ``legs`` exactly once (a tensor-train chain)."""
    if not isinstance(order, str) or sorted(order) != sorted(legs):
        raise ValueError(f"order: {order!r} must list each kernel leg of {legs!r} exactly once, "
                         f"e.g. {default_order(legs)!r}.")
    return order


def default_order(legs: str) -> str:
    """The tensor-train chain input -> spatial legs -> output: ``"ihwo"`` or ``"iwo"``."""
    return "i" + spatial_legs(legs) + "o"


def parse_modes(modes, legs: str) -> str:
    """``modes`` checked to name distinct legs of ``legs`` (at least one), in the given order."""
    if not isinstance(modes, str) or not modes or len(set(modes)) != len(modes) \
            or not set(modes) <= set(legs):
        raise ValueError(f"modes: {modes!r} must name distinct kernel legs of {legs!r}, e.g. 'oi' "
                         f"(Tucker-2 over the channels) or {legs!r} (full Tucker).")
    return modes


def _in_kernel_order(side: str, legs: str) -> str:
    return "".join(leg for leg in legs if leg in side)
