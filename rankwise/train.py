"""Fine-tuning loop used after compression (and by incremental compression).

A plain, well-behaved loop: AdamW, a progress bar, training and validation loss per epoch,
the best validation weights restored at the end, and an early stop when the validation loss
stops improving while the gap to the training loss widens (overfitting: the two losses
diverge). With ``teacher=`` the loss is knowledge distillation from the original model,

    L = T^2 KL(softmax(z_teacher / T) || softmax(z_student / T)),

which needs no labels, so fine-tuning can run on unlabelled data.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from rankwise.batches import move_to
from rankwise.batchnorm import recalibrate_batchnorm
from rankwise.batchnorm_modes import resolve_batchnorm, train_mode

DEFAULT_LR = 1e-4


@dataclass
class FineTuneHistory:
    """Losses per epoch of one :func:`fine_tune` run.

    Attributes
    ----------
    train_loss, val_loss : list of float
        Mean loss of each epoch (``val_loss`` is empty without validation data).
    initial_val_loss : float or None
        Validation loss before any training.
    best_epoch : int or None
        The epoch (counted from 1) whose weights were kept; 0 when no epoch improved on the
        initial weights, which were then restored; ``None`` without validation data (the
        last weights are kept).
    stopped_early : bool
        True when the loop stopped before ``epochs`` because the losses diverged.
    batchnorm : str
        The BatchNorm mode that applied (:mod:`rankwise.batchnorm_modes`; ``"none"`` for a
        model without BatchNorm).
    """

    train_loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    initial_val_loss: float | None = None
    best_epoch: int | None = None
    stopped_early: bool = False
    batchnorm: str = "none"


def distillation_loss(student_logits, teacher_logits, temperature: float = 2.0) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    teacher = nn.functional.log_softmax(teacher_logits / temperature, dim=-1)
    student = nn.functional.log_softmax(student_logits / temperature, dim=-1)
    kl = nn.functional.kl_div(student.flatten(0, -2), teacher.flatten(0, -2), log_target=True,
                              reduction="batchmean")
    return temperature ** 2 * kl


def fine_tune(model: nn.Module, train_data, *, epochs: int, loss_fn=None, lr: float | None = None,
              val_data=None, teacher: nn.Module | None = None, temperature: float = 2.0,
              patience: int = 2, weight_decay: float = 0.0, progress: bool = True,
              batchnorm: str = "auto") -> FineTuneHistory:
    """Fine-tune ``model`` in place and return the losses per epoch.

    Parameters
    ----------
    model : torch.nn.Module
        Trained in place; left in eval mode with the best validation weights (its initial
        weights count: fine-tuning that only hurts is undone). On any error its weights are
        restored to what they were.
    train_data : iterable
        Batches ``(inputs, targets)``; with ``teacher``, batches may be inputs alone.
    epochs : int
        Maximum number of passes over ``train_data``.
    loss_fn : callable, optional
        ``loss_fn(outputs, targets)``; cross-entropy by default. Ignored with ``teacher``.
    lr : float, optional
        AdamW learning rate (default 1e-4, gentle enough not to undo a trained network).
    val_data : iterable, optional
        Validation batches, same form as ``train_data``. Enables restoring the best weights
        and the early stop.
    teacher : torch.nn.Module, optional
        Distil from this model (typically the original network) instead of using targets.
    temperature : float
        Distillation temperature ``T``.
    patience : int
        Stop when the validation loss has not improved for ``patience`` epochs while the
        validation-minus-training gap grew over them.
    weight_decay : float
        AdamW weight decay.
    progress : bool
        Show a progress bar per epoch.
    batchnorm : {"auto", "frozen", "reestimate", "train"}
        What the BatchNorms do while the rest trains (:mod:`rankwise.batchnorm_modes`):
        ``"frozen"`` keeps their running statistics (eval mode), ``"reestimate"`` keeps them
        while training and re-estimates them on ``train_data`` after each epoch, ``"train"`` is
        torch's train mode; ``"auto"`` is ``"frozen"`` for fewer than 10,000 samples, else
        ``"train"`` (also when ``train_data`` cannot be counted without running it).
        Re-estimating from fewer samples warns.

    Returns
    -------
    FineTuneHistory
    """
    _check_fine_tune_arguments(epochs, lr, patience, teacher, loss_fn)
    mode = resolve_batchnorm(batchnorm, model, train_data)
    initial_state = copy.deepcopy(model.state_dict())
    teacher_was_training = teacher is not None and teacher.training
    if teacher is not None:
        teacher.eval()
    try:
        history = _fine_tune_epochs(model, train_data, val_data, epochs, patience, progress, mode,
                                    _batch_loss(model, teacher, loss_fn or nn.functional.cross_entropy,
                                                temperature),
                                    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                                      lr=DEFAULT_LR if lr is None else lr,
                                                      weight_decay=weight_decay))
    except BaseException:
        model.load_state_dict(initial_state)  # nothing half-changed on error
        raise
    finally:
        if teacher_was_training:
            teacher.train()
    model.eval()
    return history


def _fine_tune_epochs(model, train_data, val_data, epochs, patience, progress, mode, batch_loss,
                      optimiser) -> FineTuneHistory:
    history, best_state, best_loss = FineTuneHistory(batchnorm=mode), None, math.inf
    if val_data is not None:
        history.initial_val_loss = best_loss = evaluate_loss(model, val_data, batch_loss)
        history.best_epoch, best_state = 0, copy.deepcopy(model.state_dict())
    for epoch in range(1, epochs + 1):
        history.train_loss.append(_train_epoch(model, train_data, batch_loss, optimiser, mode,
                                               f"fine-tune epoch {epoch}/{epochs}", progress))
        if mode == "reestimate":
            recalibrate_batchnorm(model, train_data)
        if val_data is None:
            continue
        history.val_loss.append(evaluate_loss(model, val_data, batch_loss))
        if history.val_loss[-1] < best_loss:
            history.best_epoch, best_loss = epoch, history.val_loss[-1]
            best_state = copy.deepcopy(model.state_dict())
        elif _diverged(history, patience):
            history.stopped_early = True
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


def evaluate_loss(model: nn.Module, data, batch_loss) -> float:
    """Mean of ``batch_loss(model, batch)`` over ``data``, in eval mode without gradients."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data:
            total += batch_loss(model, batch).item()
            count += 1
    return total / max(count, 1)


def _batch_loss(model, teacher, loss_fn, temperature):
    device = next(model.parameters()).device

    def supervised(m, batch):
        if not isinstance(batch, tuple | list) or len(batch) < 2:
            raise ValueError("train_data: batches must be (inputs, targets) without a teacher; "
                             "pass teacher=original_model to fine-tune on unlabelled inputs.")
        inputs, targets = move_to(batch[0], device), move_to(batch[1], device)
        return loss_fn(m(inputs), targets)

    def distilled(m, batch):
        inputs = move_to(batch[0] if isinstance(batch, tuple | list) else batch, device)
        with torch.no_grad():
            target_logits = teacher(inputs)
        return distillation_loss(m(inputs), target_logits, temperature)

    return supervised if teacher is None else distilled


def _train_epoch(model, data, batch_loss, optimiser, mode, description, progress) -> float:
    train_mode(model, mode)
    total, count = 0.0, 0
    for batch in tqdm(data, desc=description, disable=not progress, leave=False):
        loss = batch_loss(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fine_tune: the training loss became {loss.item()}; "
                                     "lower lr.")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        total, count = total + loss.item(), count + 1
    if count == 0:
        raise ValueError("train_data: the iterable yielded no batch.")
    return total / count


def _diverged(history: FineTuneHistory, patience: int) -> bool:
    """No validation improvement for ``patience`` epochs while the train/val gap widened.

    The gap ``val - train`` is compared with its value at the best epoch (at its first epoch
    when the initial weights are still the best).
    """
    since_best = len(history.val_loss) - history.best_epoch
    if since_best < patience:
        return False
    gaps = [v - t for t, v in zip(history.train_loss, history.val_loss)]
    return gaps[-1] > gaps[max(history.best_epoch, 1) - 1]


def _check_fine_tune_arguments(epochs, lr, patience, teacher, loss_fn) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs: expected a positive integer, got {epochs!r}.")
    if lr is not None and not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: expected a positive number, got {lr!r}.")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience: expected a positive integer, got {patience!r}.")
    if teacher is not None and loss_fn is not None:
        raise ValueError("loss_fn and teacher are exclusive: with a teacher the loss is distillation.")
