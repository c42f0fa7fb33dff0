"""``rw.recover``: train a compressed network back toward the original, never making it worse.

One procedure for every network (a CNN with BatchNorm, a causal language model):

1. hold out part of ``data`` (:mod:`rankwise.holdout`: every 4th batch with ``validation="auto"``)
   and score the compressed network there: the divergence of its outputs from the original's
   (:mod:`rankwise.divergence`: the KL divergence for logits, token by token for a language model);
2. train on the rest toward the original (:mod:`rankwise.recovery.objectives`), with BatchNorm
   handled as ``batchnorm`` says (:mod:`rankwise.batchnorm_modes`) and the learning-rate rule of
   :mod:`rankwise.recovery.loop`:

   - ``method="features"``: each compressed layer learns the original layer's output from the
     compressed network's own input to it (feature / block-wise distillation; the factors of
     the compressed layers are trained);
   - ``method="logits"``: the whole network learns the original's outputs (every learnable);
   - ``method="lora"``: only low-rank corrections of the compressed layers' factors are trained
     toward the original's outputs, then merged back (:mod:`rankwise.recovery.lora`): structure
     and learnable count unchanged;

3. keep the best-scoring epoch's weights, and keep them only if they score better on the held-out
   batches than the network did before recovery; otherwise put every weight and statistic back.

:class:`RecoveryRecord` says what was done and what it changed (before / after on validation).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

from torch import nn
from torch.utils.data import RandomSampler

from rankwise.batchnorm import recalibrate_batchnorm
from rankwise.batchnorm_modes import check_batchnorm, resolve_batchnorm
from rankwise.divergence import HeldOutScorer
from rankwise.forms import compressed_forms
from rankwise.holdout import HeldOutSplit, check_validation
from rankwise.learnables import count_learnables
from rankwise.recovery.lora import DEFAULT_LORA_RANK, attach_corrections, factor_groups, merge_corrections
from rankwise.recovery.loop import RELATIVE_LR, RecoveryLoop, rms_scales
from rankwise.recovery.objectives import FeatureDistillation, OutputDistillation, feature_layers
from rankwise.tables import format_table

METHODS = ("features", "logits", "lora")


@dataclass
class RecoveryRecord:
    """What :func:`recover` did; ``print(record)`` shows it.

    Attributes
    ----------
    method, batchnorm : str
        The method and the BatchNorm mode that applied (``"none"``: no BatchNorm).
    batchnorm_reason : str
        Why that mode (``batchnorm="auto"`` measures it; see :func:`measured_batchnorm`).
    score : str
        How the held-out batches were scored (``"kl"``, ``"relative_error"``, ``"score_fn"``).
    validation_before, validation_after : float
        The held-out score before recovery and of the network kept (lower is better).
    best_trained : float
        The best held-out score training reached (kept only when below ``validation_before``).
    kept : bool
        Whether the recovered weights were kept.
    train_loss, val_score : list of float
        Per epoch (per phase and epoch for ``"lora"``).
    trained_tensors : int
        Number of tensors trained.
    seconds : float
    """

    method: str
    batchnorm: str
    score: str
    validation_before: float
    validation_after: float = math.nan
    best_trained: float = math.nan
    kept: bool = False
    train_loss: list = field(default_factory=list)
    val_score: list = field(default_factory=list)
    trained_tensors: int = 0
    held_out_batches: int = 0
    seconds: float = 0.0
    batchnorm_reason: str = ""

    def table(self) -> str:
        rows = [(str(i), f"{t:.4g}", f"{v:.4g}") for i, (t, v) in enumerate(zip(self.train_loss, self.val_score), 1)]
        outcome = "kept" if self.kept else "NOT kept (no better than before: weights put back)"
        return format_table(("epoch", "train loss", f"validation {self.score}"), rows, footer=(
            f"recover: method={self.method}, batchnorm={self.batchnorm} ({self.batchnorm_reason}); validation {self.score} on "
            f"{self.held_out_batches} held-out batches {self.validation_before:.4g} -> {self.validation_after:.4g} "
            f"(best trained {self.best_trained:.4g}), {outcome}; {self.seconds:.1f} s"))

    def __str__(self) -> str:
        return self.table()


def recover(compressed: nn.Module, original: nn.Module, data, *, method: str = "logits", epochs: int = 2,
            lr: float | None = None, validation="auto", batchnorm: str = "auto", lora_rank: int = DEFAULT_LORA_RANK,
            sequential: bool = True, temperature: float = 1.0, forward_fn=None, score_fn="auto",
            progress: bool = True) -> RecoveryRecord:
    """Recover a compressed network from the original, in place, never worse on held-out data.

    See the module docstring for the procedure.

    Parameters
    ----------
    compressed : torch.nn.Module
        The compressed network; trained in place and left in eval mode. Its weights and
        BatchNorm statistics are put back when recovery does not improve the held-out score,
        and on any error.
    original : torch.nn.Module
        The network it was compressed from (the teacher; not modified).
    data : iterable
        Re-iterable batches (a list, a ``DataLoader``) of inputs: tensors, tuples whose first
        item is the input (labels are not used), dicts of keyword arguments.
    method : {"features", "logits", "lora"}
        What is trained toward what (module docstring).
    epochs : int
        Passes over the training part of ``data`` (per phase for sequential ``"lora"``).
    lr : float, optional
        The relative learning rate of :mod:`rankwise.recovery.loop` (default 1e-2: each step
        moves a weight by about ``lr`` times its tensor's RMS).
    validation : "auto", float or iterable
        Held-out batches (:mod:`rankwise.holdout`): ``"auto"`` every 4th batch of ``data``, a
        fraction, or separate batches.
    batchnorm : {"auto", "frozen", "reestimate", "train"}
        :mod:`rankwise.batchnorm_modes`; ``"auto"`` is measured here (:func:`measured_batchnorm`):
        ``"train"`` when re-estimated statistics score better on the held-out batches, else
        ``"frozen"``.
    lora_rank : int
        Rank ``k`` of each correction (``method="lora"``).
    sequential : bool
        ``"lora"``: train the output-side factors' corrections, merge, then the others'.
    temperature : float
        Distillation temperature of the output methods.
    forward_fn : callable, optional
        ``forward_fn(model, batch) -> outputs``.
    score_fn : "auto", "kl", "relative_error" or callable
        The held-out score (:mod:`rankwise.divergence`); ``"kl"`` or ``"relative_error"`` also sets
        the output methods' training loss (pass ``"kl"`` for a classifier fed unlabelled tensors,
        whose logits ``"auto"`` cannot recognise).
    progress : bool
        Progress bars.

    Returns
    -------
    RecoveryRecord
    """
    _check(compressed, original, data, method, epochs, lr, validation, lora_rank, temperature)
    check_batchnorm(batchnorm)
    if method == "features":
        feature_layers(compressed, original)
    elif method == "lora":
        factor_groups(compressed, sequential)
    start, initial = time.perf_counter(), copy.deepcopy(compressed.state_dict())
    original_mode = original.training
    original.eval()
    try:
        split = HeldOutSplit(data, validation)
        for _ in split:  # collects the held-out batches
            pass
        if not split.held_out:
            raise ValueError("validation: no batch is held out (validation='auto' holds out every 4th batch "
                             "from the 2nd, so give at least 2 batches, or pass validation=separate_batches).")
        scorer = HeldOutScorer(original, split.held_out, forward_fn, score_fn)
        before = scorer.score(compressed)
        mode, reason = measured_batchnorm(compressed, split, scorer, before, forward_fn) \
            if batchnorm == "auto" else (resolve_batchnorm(batchnorm, compressed, data), "as asked")
        record = RecoveryRecord(method, mode, scorer.name, before, held_out_batches=len(split.held_out),
                                batchnorm_reason=reason)
        loop = RecoveryLoop(compressed, _objective(method, compressed, original, forward_fn, temperature, scorer.name),
                            scorer, mode, progress)
        try:
            record.best_trained = _train(loop, compressed, split, method, epochs, lr or RELATIVE_LR,
                                         lora_rank, sequential, record)
        finally:
            loop.objective.close()
        record.train_loss, record.val_score = loop.train_loss, loop.val_score
        record.kept = record.best_trained < record.validation_before
        if not record.kept:
            compressed.load_state_dict(initial)
        record.validation_after = record.best_trained if record.kept else record.validation_before
    except BaseException:
        merge_corrections([m for m in compressed.modules()], keep=False)
        compressed.load_state_dict(initial)
        raise
    finally:
        original.train(original_mode)
        compressed.eval()
    record.seconds = time.perf_counter() - start
    return record


def measured_batchnorm(compressed, fitted, scorer, before: float, forward_fn) -> tuple[str, str]:
    """``batchnorm="auto"`` for :func:`recover`: ``"train"`` when re-estimating the BatchNorm
    statistics on the training batches (:func:`rankwise.recalibrate_batchnorm`, on a copy)
    scores better on the held-out batches than the stored statistics (the compression changed
    what the BatchNorms see: let them follow), else ``"frozen"`` (the stored statistics still
    describe the network better than these batches do). ``("none", ...)`` without BatchNorm."""
    if resolve_batchnorm("frozen", compressed, fitted) == "none":
        return "none", "no BatchNorm"
    trial = copy.deepcopy(compressed)
    recalibrate_batchnorm(trial, fitted, forward_fn=forward_fn)
    score = scorer.score(trial)
    del trial
    verdict = "better" if score < before else "not better"
    return ("train" if score < before else "frozen"), (
        f"auto: statistics re-estimated on the training batches score {score:.4g} against {before:.4g} "
        f"stored ({verdict})")


def _objective(method, compressed, original, forward_fn, temperature, score: str):
    if method == "features":
        return FeatureDistillation(original, compressed, forward_fn)
    kind = {"kl": "kl", "relative_error": "mse"}.get(score)
    return OutputDistillation(original, forward_fn, temperature, kind)


def _train(loop, compressed, split, method, epochs, relative_lr, lora_rank, sequential, record) -> float:
    """Run the loop (per phase for ``"lora"``); returns the best held-out score reached."""
    score = record.validation_before
    if method != "lora":
        trainable = [p for name, form in compressed_forms(compressed).items() if name for p in form.parameters()] \
            if method == "features" else list(compressed.parameters())
        scales = rms_scales(compressed, trainable)
        record.trained_tensors = len(scales)
        return loop.run(split, scales, epochs, relative_lr, score)
    for phase, factors in enumerate(factor_groups(compressed, sequential), 1):
        scales = attach_corrections(factors, lora_rank, seed=phase)
        record.trained_tensors += len(scales)
        try:
            score = loop.run(split, scales, epochs, relative_lr, score, label=f"lora phase {phase}")
        finally:
            merge_corrections(factors, keep=True)
    return score


def _check(compressed, original, data, method, epochs, lr, validation, lora_rank, temperature) -> None:
    for name, value in (("compressed", compressed), ("original", original)):
        if not isinstance(value, nn.Module):
            raise ValueError(f"{name}: expected a torch.nn.Module, got {type(value).__name__}.")
    if compressed is original:
        raise ValueError("original: it is the compressed model itself; pass the network it was "
                         "compressed from (keep a copy before compressing with inplace=True).")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, METHODS))}, got {method!r}.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs: expected a positive integer, got {epochs!r}.")
    for name, value in (("lr", lr), ("temperature", temperature)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{name}: expected a positive number, got {value!r}.")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
        raise ValueError(f"lora_rank: expected a positive integer, got {lora_rank!r}.")
    if validation is None:
        raise ValueError("validation: recovery keeps its result only if it scores better on held-out "
                         "batches; pass 'auto' (every 4th batch), a fraction, or separate batches.")
    check_validation(validation)
    if iter(data) is data:
        raise ValueError("data: recovery passes over it several times; pass a list or a DataLoader, "
                         "not an iterator or generator.")
    if isinstance(getattr(data, "sampler", None), RandomSampler) and isinstance(validation, str | float | int):
        raise ValueError("data: a shuffling DataLoader gives other batches at every pass, so batches held out "
                         "from it would be trained on in later epochs; pass validation=separate_batches, or "
                         "a DataLoader with shuffle=False.")
    if count_learnables(compressed) == 0:
        raise ValueError("compressed: it has no learnable to train.")
