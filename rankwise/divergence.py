"""How far a compressed network's outputs are from the original's: the scores of measured choices.

Where the library must choose between candidate compressions (:mod:`rankwise.selection`), it
runs each on held-out calibration batches and compares its outputs ``z'`` with the original's
``z`` on the same batches. The comparison follows what the output is:

- **logits** (a Hugging Face output's ``.logits``, or a ``(N, C)`` tensor whose batch carries
  integer class labels ``(N,)``): the mean over output rows of the Kullback-Leibler divergence

      KL(p || p') = sum_c p_c (log p_c - log p'_c),    p = softmax(z), p' = softmax(z'),

  the divergence whose Hessian at ``z' = z`` is the Fisher information that ``loss_fn="kl"``
  gathers (:mod:`rankwise.statistics.gradients`);
- **anything else** (embeddings, hidden states, regression outputs): the relative squared
  error ``sum |z' - z|^2 / sum |z|^2`` over every row of every held-out batch, the divergence of
  ``loss_fn="mse"``.

Rows are the positions of the output's last dimension; a dict batch's ``attention_mask`` keeps
padding positions out of both. :func:`rankwise.statistics.gradients.output_loss` states the same rule for the loss whose
gradients ``NeuronPCA(loss_fn="auto")`` gathers, so the estimate the decisions use and the score
that checks them measure one thing. A user's ``score_fn(compressed_outputs, original_outputs,
batch) -> float`` (lower is better) replaces both; its scores are averaged over the batches.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.batches import eval_mode, forward, model_device, move_to
from rankwise.statistics.gradients import output_loss

SCORES = ("auto", "kl", "relative_error")


def output_tensor(outputs) -> torch.Tensor:
    """The tensor an output is judged by: ``.logits``, else ``.last_hidden_state``, else the
    output itself, the first item of a tuple or list, or a ``PackedSequence``'s data."""
    for field in ("logits", "last_hidden_state"):
        if getattr(outputs, field, None) is not None:
            return getattr(outputs, field)
    if isinstance(outputs, tuple | list) and outputs:
        return output_tensor(outputs[0])
    if isinstance(outputs, nn.utils.rnn.PackedSequence):
        return outputs.data
    if isinstance(outputs, torch.Tensor):
        return outputs
    raise ValueError(f"score_fn: the model's output ({type(outputs).__name__}) is not a tensor, a tuple "
                     "starting with one, nor carries .logits or .last_hidden_state; pass "
                     "score_fn=lambda compressed, original, batch: ... (lower is better).")


def check_score_fn(score_fn) -> None:
    """``score_fn`` must be ``"auto"``, ``"kl"``, ``"relative_error"`` or a callable."""
    if not (score_fn in SCORES or callable(score_fn)):
        raise ValueError(f"score_fn: expected one of {', '.join(map(repr, SCORES))} or a callable "
                         f"(compressed_outputs, original_outputs, batch) -> float, lower is better; "
                         f"got {score_fn!r}.")


class HeldOutScorer:
    """The original network's outputs on held-out batches, and the score of any network on them.

    Parameters
    ----------
    model : torch.nn.Module
        The original network; its outputs are computed once here (in eval mode, no gradients).
    batches : list
        The held-out batches.
    forward_fn : callable, optional
        ``forward_fn(model, batch) -> outputs``.
    score_fn : "auto", "kl", "relative_error" or callable
        How outputs are compared (see the module docstring): ``"auto"`` follows
        :func:`~rankwise.statistics.gradients.output_loss` on the first batch.
    """

    def __init__(self, model: nn.Module, batches: list, forward_fn=None, score_fn="auto"):
        check_score_fn(score_fn)
        self.batches, self.forward_fn = batches, forward_fn
        self._score_fn = score_fn if callable(score_fn) else None
        self.name = "score_fn" if callable(score_fn) else score_fn
        self.originals = []  # the original's outputs (for score_fn) or their rows, batch by batch
        for batch, outputs in self._outputs(model):
            if self.name == "auto":
                self.name = "kl" if output_loss(outputs, batch) == "kl" else "relative_error"
            self.originals.append(outputs if self._score_fn else self._rows(outputs, batch))

    def score(self, model: nn.Module) -> float:
        """The divergence of ``model``'s outputs from the original's over the held-out batches,
        computed one batch at a time (one batch's outputs in memory)."""
        total = norm = 0.0
        for (batch, outputs), original in zip(self._outputs(model), self.originals):
            if self._score_fn is not None:
                total, norm = total + float(self._score_fn(outputs, original, batch)), norm + 1
                continue
            compressed, original = self._rows(outputs, batch).double(), original.double()
            if self.name == "kl":
                compressed, original = compressed.log_softmax(-1), original.log_softmax(-1)
                total += float((original.exp() * (original - compressed)).sum())
                norm += len(original)
            else:
                total += float((compressed - original).square().sum())
                norm += float(original.square().sum())
        return total / max(norm, 1e-300)

    def _outputs(self, model: nn.Module):
        """``(batch, outputs)`` of each held-out batch, computed as they are asked for."""
        with torch.no_grad(), eval_mode(model):
            for batch in self.batches:
                yield batch, _run(model, batch, self.forward_fn)

    def _rows(self, outputs, batch) -> torch.Tensor:
        """The output's rows (last dimension kept), float32 on the CPU (the log-probabilities of
        ``"kl"`` are taken in float64 when scoring), padding positions left out."""
        tensor = output_tensor(outputs).detach()
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if mask is not None and tensor.dim() >= 2 and tuple(tensor.shape[:2]) == tuple(mask.shape):
            tensor = tensor[mask.to(tensor.device).bool()]
        return tensor.reshape(-1, tensor.shape[-1] if tensor.dim() else 1).float().cpu()


def _run(model: nn.Module, batch, forward_fn):
    return forward(model, move_to(batch, model_device(model)), forward_fn)
