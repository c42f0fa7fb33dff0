"""The recovery loop and its learning-rate rule.

Learning-rate rule (why recovery does not undo a trained network)
    Adam moves each entry of a tensor by about its learning rate per step, whatever the
    gradient's scale. Recovery gives each trained tensor ``p`` the rate

        lr_p = relative_lr * RMS(p)          (RELATIVE_LR = 1e-2 by default),

    so one step changes any weight by about 1% of the typical size of its tensor, for a
    factor of RMS 1e-2 as for one of RMS 1 (a single absolute rate is either too small for
    the one or destructive for the other). A tensor that is zero (a fresh bias) takes the RMS
    of its module's other tensors; a low-rank correction takes the scale of the weight it
    corrects (:meth:`rankwise.recovery.lora.LowRankCorrection.lr_scales`). The rate follows a
    cosine from ``lr_p`` to 0 over all the steps, and there is no weight decay (it would pull
    the factors toward zero, away from the trained network).

Each epoch is scored on the held-out batches (:class:`rankwise.divergence.HeldOutScorer`); the
weights of the best-scoring epoch are kept, the starting weights included: an epoch that only
hurts is undone.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from rankwise.batches import batch_count, model_device, move_to
from rankwise.batchnorm import recalibrate_batchnorm
from rankwise.batchnorm_modes import train_mode

RELATIVE_LR = 1e-2


def rms_scales(model: nn.Module, parameters) -> dict:
    """``{p: RMS(p)}`` for the trainable ``parameters`` of ``model`` (see the module docstring
    for a zero tensor)."""
    wanted = {id(p) for p in parameters}
    scales = {}
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False)]
        fallback = max((_rms(p) for p in own), default=0.0) or 1e-2
        for p in own:
            if id(p) in wanted and p.requires_grad:
                scales[p] = _rms(p) or fallback
    return scales


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.detach().float().square().mean().sqrt()) if tensor.numel() else 0.0


def optimiser_for(scales: dict, relative_lr: float) -> torch.optim.Optimizer:
    """Adam with one group per tensor at ``relative_lr * scale``."""
    return torch.optim.Adam([{"params": [p], "lr": relative_lr * s} for p, s in scales.items()],
                            lr=relative_lr)


class RecoveryLoop:
    """Train on ``fitted`` toward ``objective``, scoring each epoch with ``scorer``.

    Parameters
    ----------
    model : torch.nn.Module
        Trained in place.
    objective : callable
        ``objective(model, batch) -> loss`` (:mod:`rankwise.recovery.objectives`).
    scorer : rankwise.divergence.HeldOutScorer
        Scores the model on the held-out batches (lower is better).
    batchnorm : str
        The resolved BatchNorm mode (:mod:`rankwise.batchnorm_modes`).
    progress : bool
        Progress bars.
    """

    def __init__(self, model: nn.Module, objective, scorer, batchnorm: str, progress: bool):
        self.model, self.objective, self.scorer = model, objective, scorer
        self.batchnorm, self.progress = batchnorm, progress
        self.train_loss, self.val_score = [], []

    def run(self, fitted, scales: dict, epochs: int, relative_lr: float, start_score: float,
            label: str = "recover") -> float:
        """Train ``epochs`` epochs of the tensors in ``scales``; keep the best-scoring weights
        (``start_score``: the score of the weights now). Returns the score kept."""
        optimiser = optimiser_for(scales, relative_lr)
        steps = batch_count(fitted)
        total = None if steps is None else max(epochs * steps, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda step: 1.0 if total is None else 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
        best_score, best_state = start_score, copy.deepcopy(self.model.state_dict())
        for epoch in range(1, epochs + 1):
            self.train_loss.append(self._epoch(fitted, optimiser, schedule, f"{label} epoch {epoch}/{epochs}"))
            if self.batchnorm == "reestimate":
                recalibrate_batchnorm(self.model, fitted)
            self.val_score.append(self.scorer.score(self.model))
            if self.val_score[-1] < best_score:
                best_score, best_state = self.val_score[-1], copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict(best_state)
        return best_score

    def _epoch(self, fitted, optimiser, schedule, description) -> float:
        train_mode(self.model, self.batchnorm)
        device, total, count = model_device(self.model), 0.0, 0
        try:
            for batch in tqdm(fitted, desc=description, disable=not self.progress, leave=False):
                loss = self.objective(self.model, move_to(batch, device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"recover: the training loss became {loss.item()}; lower lr.")
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                total, count = total + loss.item(), count + 1
        finally:
            self.model.eval()
        if count == 0:
            raise ValueError("data: no batch is left to train on once the validation batches are held out.")
        return total / count
