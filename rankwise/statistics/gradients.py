"""Gradient statistics of layer outputs: how much the network's output cares about each direction.

The variance criterion judges a layer's error by the variance it removes from the layer's own
output. The network, though, may amplify some output directions and ignore others. With ``g``
the gradient of a loss with respect to a layer's output row and ``d`` a small perturbation of
that row, the loss changes to second order by ``1/2 d^T H d``; for a loss that is a divergence
from the original network's outputs, the Hessian at the original is the Fisher information,
``H = E[g g^T]`` with ``g`` drawn by sampling targets from the network itself:

- ``loss_fn="kl"`` (classifiers: the outputs are logits over the last dimension, or a
  Hugging Face output's ``.logits``): ``y ~ softmax(z)``, loss ``cross_entropy(z, y)``, so
  ``g = J^T (softmax(z) - e_y)`` and ``E[g g^T]`` is the Fisher of the categorical model,
  the Hessian of ``KL(p_original || p)``;
- ``loss_fn="mse"`` (embeddings, regression: the output tensor, or a Hugging Face output's
  ``last_hidden_state``): ``e ~ N(0, I)``, loss ``e^T z``, so ``g = J^T e`` and
  ``E[g g^T] = J^T J``, the Hessian of ``1/2 |z - z_original|^2``;
- a callable ``loss_fn(outputs, batch) -> scalar``: the empirical gradients of that loss (for
  example a cross-entropy against the batch's labels).

Per batch this costs one forward and one backward pass. The gradients are taken with
``torch.autograd.grad`` on the layers' outputs, so the parameters' ``.grad`` are never touched;
parameters that do not require gradients are switched on for the pass and restored afterwards.
Rows follow the activation convention of :mod:`rankwise.statistics.dense` (a ``Linear``: every leading
position; a convolution: every spatial position), and the per-row moments are accumulated in
float64 (:class:`~rankwise.moments.Moments`).

Padded batches (:mod:`rankwise.masks`): the token mask active when a layer runs selects the rows
of its output gradient, and the mask active when the model runs selects the rows of its outputs
that the built-in losses read (``z`` above: the targets, or the noise ``e``, are drawn for the
real tokens only), so padding neither enters a statistic nor reaches a real token's gradient
through the attention of padded positions. The gradient of an activation shared by the batch
(BERT's ``(1, T)`` position embeddings) is the sum of its sequences' gradients: it is taken
whole, one row per position, an unbiased estimate of the per-sequence sum ``E[sum g g^T]`` since
the sequences' sampled targets are independent and of zero-mean score.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from rankwise.batches import as_batches, batch_count, batch_index, default_forward, model_device, move_to, run_batch
from rankwise.kinds import kind_of
from rankwise.masks import active_mask, token_rows
from rankwise.moments import Moments
from rankwise.statistics.dense import channel_rows

LOSSES = ("kl", "mse")
AUTO_GRADIENT_EVERY = 4
"""With ``loss_fn="auto"``, every fourth batch (from the first) runs the backward pass."""


def check_loss_fn(loss_fn) -> None:
    """``loss_fn`` must be ``"kl"``, ``"mse"`` or a callable ``(outputs, batch) -> scalar``."""
    if not (loss_fn in LOSSES or callable(loss_fn)):
        raise ValueError(f"loss_fn: expected 'kl' (classifier logits), 'mse' (embeddings or "
                         f"regression outputs) or a callable (outputs, batch) -> scalar loss, "
                         f"got {loss_fn!r}.")


def output_loss(outputs, batch) -> str:
    """The loss an output defines: ``"kl"`` for logits (a ``.logits`` output, or a ``(N, C)``
    tensor of a batch ``(inputs, labels)`` with integer labels of shape ``(N,)``), else ``"mse"``.

    Raises
    ------
    ValueError
        For an output no built-in loss reads (see :func:`_output_tensor`).
    """
    if getattr(outputs, "logits", None) is not None:
        return "kl"
    tensor = _output_tensor(outputs, "mse")
    labels = batch[1] if isinstance(batch, tuple | list) and len(batch) > 1 else None
    if (isinstance(labels, torch.Tensor) and not labels.is_floating_point() and not labels.is_complex()
            and tensor.dim() == 2 and tensor.shape[1] > 1 and labels.shape == tensor.shape[:1]):
        return "kl"
    return "mse"


@dataclass(frozen=True)
class InputOf:
    """An entry of :func:`gradient_moments`' ``layers`` asking for the gradients with respect to
    the ``Linear`` ``layer``'s **input** rows (a tied head's, :mod:`rankwise.ranks.tied`)."""

    layer: nn.Linear


def empty_gradient_moments(layers: dict, device) -> dict[str, Moments]:
    """The gradient moments of no data: per layer, zero moments of its output width (of its input
    width for an :class:`InputOf` entry), on ``device``."""
    return {name: Moments.zeros(layer.layer.in_features if isinstance(layer, InputOf)
                                else kind_of(layer).weight(layer).shape[0], device=device)
            for name, layer in layers.items()}


def gradient_moments(model: nn.Module, data, layers: dict[str, nn.Module], loss_fn="kl",
                     forward_fn=None, max_batches: int | None = None, progress: str | None = None,
                     seed: int = 0, handles: list = (), every: int = 1) -> tuple[dict[str, Moments], int, int]:
    """Moments of the loss gradients with respect to each layer's output rows.

    With ``every = k > 1`` only batches ``0, k, 2k, ...`` run the backward pass; the others run
    forward only, for the hooks in ``handles`` (the Fisher information is then estimated from
    about ``1/k`` of the samples, at about ``1/k`` of the backward passes' cost).

    Parameters
    ----------
    model : torch.nn.Module
        Run in eval mode; its training flag, its parameters' ``requires_grad`` flags and
        their ``.grad`` are as before afterwards.
    data : iterable or torch.Tensor
        Calibration batches (see :mod:`rankwise.batches`).
    layers : dict of str to torch.nn.Module or InputOf
        The layers whose output gradients are wanted, by qualified name (an :class:`InputOf`
        entry: the gradients of that layer's input).
    loss_fn : {"auto", "kl", "mse"} or callable
        See the module docstring; ``"auto"`` is :func:`output_loss` of the first batch, and no
        gradients at all (empty moments) where no built-in loss reads the output.
    forward_fn : callable, optional
        ``forward_fn(model, batch) -> outputs``.
    max_batches : int, optional
    progress : str, optional
        Label of a progress bar (none when ``None``).
    seed : int
        Seed of the sampled targets, so that the statistics are reproducible.
    handles : list of RemovableHandle
        Other hooks riding on the same pass (the activation statistics of
        :class:`~rankwise.NeuronPCA`); removed with this function's own when the pass ends.

    Returns
    -------
    moments : dict of str to Moments
        Per layer, the moments of its output-gradient rows (``outer = sum_t g_t g_t^T``).
    samples : int
        The number of samples (the batch dimension summed over batches), the denominator that
        makes ``outer / samples`` the Fisher information per sample.
    batches : int
        The number of batches run.
    """
    if loss_fn != "auto":
        check_loss_fn(loss_fn)
    forward_fn = forward_fn or default_forward
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    moments = empty_gradient_moments(layers, device)
    captured: dict[str, tuple] = {}  # name -> (output, the token mask of its rows)
    output_mask: dict = {}  # "mask" -> the token mask active when the model ran
    handles = list(handles) + [
        _observed(layer).register_forward_hook(_capture(name, captured, inputs=isinstance(layer, InputOf)))
        for name, layer in layers.items()]
    handles.append(model.register_forward_hook(_capture_mask(output_mask)))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    was_training = model.training
    samples = batches = 0
    try:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
        total = batch_count(data) if max_batches is None else min(batch_count(data) or max_batches, max_batches)
        for batches, batch in enumerate(tqdm(itertools.islice(as_batches(data), max_batches), total=total,
                                             desc=progress, disable=progress is None), start=1):
            batch = move_to(batch, device)
            captured.clear(), output_mask.clear()
            if loss_fn is None or (batches - 1) % every:
                with torch.no_grad():
                    run_batch(model, batch, forward_fn, batch_index(data, batches - 1))
                continue
            outputs = run_batch(model, batch, forward_fn, batch_index(data, batches - 1))
            if loss_fn == "auto":
                loss_fn = _automatic_loss(outputs, batch)
                if loss_fn is None:
                    moments = {}
                    continue
            loss = _sampled_loss(outputs, batch, loss_fn, generator, output_mask.get("mask"))
            names = [name for name in layers if name in captured]
            grads = torch.autograd.grad(loss, [captured[name][0] for name in names], allow_unused=True) if names else ()
            for name, grad in zip(names, grads):
                if grad is not None:
                    rows = channel_rows(grad.detach(), _observed(layers[name]), captured[name][1])
                    moments[name].update_of(rows, name, "output gradients")
            samples += _batch_size(batch)
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    if batches == 0:
        raise ValueError("data: the iterable yielded no batch. Pass a DataLoader or a list of "
                         "tensors holding representative inputs.")
    return moments, samples, batches


def _automatic_loss(outputs, batch) -> str | None:
    """``loss_fn="auto"``: :func:`output_loss`, or ``None`` for an output no built-in loss reads."""
    try:
        return output_loss(outputs, batch)
    except ValueError:
        return None


def _observed(layer) -> nn.Module:
    """The module whose call a ``layers`` entry of :func:`gradient_moments` observes."""
    return layer.layer if isinstance(layer, InputOf) else layer


def _capture(name: str, captured: dict, inputs: bool = False):
    """A forward hook keeping the layer's output (its first input with ``inputs``) and the token
    mask of its own rows."""
    def hook(module, args, output):
        output = args[0] if inputs and args else output
        if isinstance(output, torch.Tensor) and output.requires_grad:
            mask = active_mask()
            captured[name] = (output, mask.exact(output) if mask else None)
    return hook


def _capture_mask(output_mask: dict):
    """A forward hook on the model keeping the token mask active when it ran."""
    def hook(module, args, output):
        output_mask["mask"] = active_mask()
    return hook


def _sampled_loss(outputs, batch, loss_fn, generator, mask=None) -> torch.Tensor:
    """The scalar to differentiate (summed over the batch, so each sample keeps its own gradient),
    on the output rows of real tokens under ``mask`` (:func:`rankwise.masks.token_rows`)."""
    if callable(loss_fn):
        loss = loss_fn(outputs, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn: the callable must return a scalar tensor (the loss of the batch).")
        return loss
    tensor = _output_tensor(outputs, loss_fn)
    rows = token_rows(tensor, mask.exact(tensor) if mask else None)
    if loss_fn == "kl":
        logits = rows.reshape(-1, rows.shape[-1])
        targets = torch.multinomial(logits.detach().float().softmax(-1), 1, generator=generator).squeeze(1)
        return nn.functional.cross_entropy(logits, targets, reduction="sum")
    noise = torch.randn(rows.shape, generator=generator, device=rows.device, dtype=rows.dtype)
    return (noise * rows).sum()


def _output_tensor(outputs, loss_fn: str) -> torch.Tensor:
    """The tensor a built-in loss reads: the outputs themselves, a Hugging Face output's
    ``logits`` ("kl") or ``last_hidden_state`` ("mse"), or the first item of a tuple."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    field = "logits" if loss_fn == "kl" else "last_hidden_state"
    if getattr(outputs, field, None) is not None:
        return getattr(outputs, field)
    if isinstance(outputs, tuple | list) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ValueError(f"loss_fn: with loss_fn={loss_fn!r} the model's output must be a tensor, a "
                     f"tuple starting with one, or carry .{field}; got {type(outputs).__name__}. "
                     "Pass a callable loss_fn(outputs, batch) instead.")


def _batch_size(batch) -> int:
    """Samples in a batch: the first dimension of its (first) input tensor."""
    if isinstance(batch, dict):
        batch = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(batch, tuple | list):
        batch = batch[0] if batch else None
    if isinstance(batch, torch.nn.utils.rnn.PackedSequence):
        return int(batch.batch_sizes[0])
    return batch.shape[0] if isinstance(batch, torch.Tensor) and batch.dim() > 0 else 1
