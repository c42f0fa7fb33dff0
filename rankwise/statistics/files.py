"""The NeuronPCA file: plain tensors in nested dicts, read back without unpickling any code.

A file holds the statistics of every batch (``layers``, ``gradients`` and their counts), the
network's learnables, the shrinkage setting, and, since format 5, the held-out batches with the
statistics of the fitted part (:mod:`rankwise.holdout`) under ``validation`` (``None`` when
nothing was held out). Files of every earlier format load (they hold nothing out).
"""

from __future__ import annotations

import warnings

import torch

from rankwise.holdout import savable
from rankwise.moments import Moments
from rankwise.statistics import from_plain, to_plain

FORMAT_VERSION = 5
# 2: gradient statistics of the loss criterion; 3: recurrent layers' reservoir; 4: a Linear layer
# with d_in <= d_out holds its input's outer, its weight and bias, and output None (derived);
# 5: the held-out batches and the statistics of the fitted part (validation)
"""Version of the file layout; files of every version up to it load."""
READABLE_VERSIONS = tuple(range(1, FORMAT_VERSION + 1))


def plain_part(stats: dict, gradients: dict, num_batches: int, gradient_samples: int) -> dict:
    """One set of statistics as plain tensors."""
    return {"layers": {name: to_plain(s) for name, s in stats.items()},
            "gradients": {name: vars(m) for name, m in gradients.items()},
            "num_batches": num_batches, "gradient_samples": gradient_samples}


def part_from_plain(plain: dict) -> tuple[dict, dict, int, int]:
    """``(stats, gradients, num_batches, gradient_samples)`` from :func:`plain_part`."""
    return ({name: from_plain(p) for name, p in plain["layers"].items()},
            {name: Moments(**m) for name, m in plain.get("gradients", {}).items()},
            plain["num_batches"], plain.get("gradient_samples", 0))


def write(path, part: dict, network_learnables: int, regularization, held_out=None, fitted_part=None) -> None:
    """Write a NeuronPCA's :func:`plain_part`, with its held-out batches (``None``: none) and the
    fitted part's statistics (``None`` when the held-out batches were given apart). Batches of
    objects other than tensors, numbers and strings are left out, with a warning."""
    validation = None
    if held_out is not None and savable(held_out):
        validation = {"batches": list(held_out), "fitted": fitted_part}
    elif held_out is not None:
        warnings.warn("path: the held-out batches hold objects other than tensors, numbers and strings, "
                      "and were not saved; the loaded NeuronPCA holds nothing out.", UserWarning, stacklevel=3)
    torch.save({"format_version": FORMAT_VERSION, **part, "network_learnables": network_learnables,
                "regularization": regularization, "validation": validation}, path)


def read(path) -> dict:
    """The dict :func:`write` wrote, its format checked (``validation`` ``None`` for older files)."""
    state = torch.load(path, weights_only=True, map_location="cpu")
    version = state.get("format_version") if isinstance(state, dict) else None
    if version not in READABLE_VERSIONS:
        raise ValueError(f"path: {path} is not a NeuronPCA file of format version "
                         f"{', '.join(map(str, READABLE_VERSIONS))} (found {version!r}).")
    return {"validation": None, **state}
