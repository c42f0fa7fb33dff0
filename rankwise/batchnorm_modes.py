"""What BatchNorm does while a compressed network is trained again: a choice made on purpose.

A BatchNorm in train mode normalises each batch by that batch's own mean and variance and moves
its running statistics toward them (``m <- (1 - 0.1) m + 0.1 mean_batch``); in eval mode it
normalises by the running statistics. Training a whole model in train mode on a few hundred
or thousand samples therefore (a) replaces statistics estimated on a full training set by the
last few batches' and (b) trains the other weights against batch statistics the evaluated
network never uses: the training loss falls while the validation loss, computed in eval mode,
rises (the diverging losses of a fine-tuned compressed CNN). The modes:

``"frozen"``
    Every BatchNorm stays in eval mode while the rest trains: the running statistics are kept
    untouched and the layers learn against the normalisation the network will run with. The
    affine scale and shift stay learnable.
``"reestimate"``
    As ``"frozen"`` while training, then the running statistics are re-estimated on the training
    data (:func:`rankwise.recalibrate_batchnorm`: cumulative averages over every batch).
``"train"``
    Torch's usual behaviour: BatchNorm in train mode, running statistics updated by momentum.
``"auto"`` (the default)
    In :func:`rankwise.fine_tune`: ``"frozen"`` when the training data has fewer than
    :data:`MIN_SAMPLES_TO_REESTIMATE` samples, else ``"train"`` (also when the samples cannot
    be counted: :func:`sample_count`). In :func:`rankwise.recover`,
    which has held-out batches and the original to score against, measured instead: ``"train"``
    when statistics re-estimated on the training batches score better on the held-out batches
    than the stored ones (the compression changed what the BatchNorms see), else ``"frozen"``
    (:func:`rankwise.recovery.recover.measured_batchnorm`).

Re-estimating statistics from fewer than :data:`MIN_SAMPLES_TO_REESTIMATE` samples
(``"reestimate"``, ``"train"``) warns with :class:`SmallBatchNormDataWarning`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from rankwise.kinds import is_batchnorm

BATCHNORM_MODES = ("auto", "frozen", "reestimate", "train")

MIN_SAMPLES_TO_REESTIMATE = 10_000
"""Fewer training samples than this keep the running statistics under ``batchnorm="auto"``.

Running statistics of a trained network were estimated over its whole training set; a few
thousand samples, often not distributed like the deployment data, estimate them worse (the
variance of a sample variance falls as ``2 sigma^4 / n`` only for independent samples, and
the positions of one image are not independent)."""


class SmallBatchNormDataWarning(UserWarning):
    """BatchNorm running statistics are re-estimated from fewer samples than
    :data:`MIN_SAMPLES_TO_REESTIMATE`."""


def check_batchnorm(batchnorm) -> None:
    """``batchnorm`` must be one of :data:`BATCHNORM_MODES`."""
    if not (isinstance(batchnorm, str) and batchnorm in BATCHNORM_MODES):
        raise ValueError(f"batchnorm: expected one of {', '.join(map(repr, BATCHNORM_MODES))} "
                         f"(see rankwise.batchnorm_modes), got {batchnorm!r}.")


def sample_count(data) -> int | None:
    """The number of samples in ``data`` (the first dimension of each batch's input summed), or
    ``None`` when ``data`` cannot be counted without running it (no length, or batches of
    another form). Lists and ``DataLoader`` s over a dataset with a length are counted."""
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    if not isinstance(data, list | tuple):
        return None
    total = 0
    for batch in data:
        first = _input_tensor(batch)
        if first is None:
            return None
        total += int(first.shape[0]) if first.dim() else 1
    return total


def _input_tensor(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, tuple | list) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        return next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    return None


def resolve_batchnorm(batchnorm: str, model: nn.Module, data) -> str:
    """The mode that applies to ``model`` trained on ``data``: ``"auto"`` resolved (see the
    module docstring), ``"none"`` when ``model`` has no BatchNorm tracking running statistics.
    Warns when statistics are re-estimated from too few samples."""
    check_batchnorm(batchnorm)
    if not any(is_batchnorm(m) and m.track_running_stats for m in model.modules()):
        return "none"
    samples = sample_count(data)
    if batchnorm == "auto":
        return "frozen" if samples is not None and samples < MIN_SAMPLES_TO_REESTIMATE else "train"
    if batchnorm != "frozen" and samples is not None and samples < MIN_SAMPLES_TO_REESTIMATE:
        warnings.warn(f"batchnorm={batchnorm!r}: the BatchNorm running statistics are re-estimated "
                      f"from {samples:,} samples (fewer than {MIN_SAMPLES_TO_REESTIMATE:,}); a trained "
                      "network's statistics are usually better kept: pass batchnorm='frozen'.",
                      SmallBatchNormDataWarning, stacklevel=3)
    return batchnorm


def train_mode(model: nn.Module, mode: str) -> nn.Module:
    """``model.train()``, then every BatchNorm back in eval mode unless ``mode`` is ``"train"``
    (or ``"none"``). Returns ``model``."""
    model.train()
    if mode not in ("train", "none"):
        for module in model.modules():
            if is_batchnorm(module):
                module.eval()
    return model
