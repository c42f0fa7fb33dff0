"""Batch conventions and the one calibration runner.

A batch is what an iterable of calibration or training data yields:

- a tensor (or a ``PackedSequence``) is the model's input;
- a tuple or list is ``(inputs, targets...)``: its first item is the input;
- a dict is passed as keyword arguments (a Hugging Face batch with ``input_ids``,
  ``attention_mask``, ...); its ``attention_mask``, when it has one, is the batch's token mask
  (:mod:`rankwise.masks`: padding positions enter no statistic);
- anything else needs ``forward_fn(model, batch)`` (which enters :func:`rankwise.token_mask`
  around its model call to mask padding).

:func:`run_batches` is the loop every statistic is gathered with (:class:`~rankwise.NeuronPCA`,
the width evolver's refits): the model in eval mode under ``torch.no_grad()``, each batch moved
to the model's device, forward hooks (registered by the caller) filling the statistics.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from tqdm.auto import tqdm

from rankwise.masks import TokenMaskError, masking
from rankwise.moments import NonFiniteActivationError


def default_forward(model: nn.Module, batch):
    """Run one batch: a tensor (or ``PackedSequence``) is the input, a tuple/list starts with
    it, a dict is kwargs."""
    if isinstance(batch, torch.Tensor | PackedSequence):
        return model(batch)
    if isinstance(batch, tuple | list) and batch:
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(f"a batch of type {type(batch).__name__} cannot be passed to the model; "
                    "pass forward_fn=lambda model, batch: ... to say how.")


def move_to(batch, device):
    """``batch`` with every tensor (and ``PackedSequence``) in it moved to ``device``."""
    if isinstance(batch, torch.Tensor | PackedSequence):
        return batch.to(device)
    if isinstance(batch, tuple | list):
        return type(batch)(move_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


def as_batches(data):
    """``data`` as an iterable of batches: a single tensor or ``PackedSequence`` is one batch."""
    return [data] if isinstance(data, torch.Tensor | PackedSequence) else data


def run_batches(model: nn.Module, data, handles: list, forward_fn=None, max_batches: int | None = None,
                progress: str | None = None, empty_message: str = "") -> int:
    """Run calibration batches through ``model`` for the hooks in ``handles``; remove them.

    Parameters
    ----------
    model : torch.nn.Module
        Run in eval mode under ``torch.no_grad()``; its training flag is restored afterwards.
    data : iterable or torch.Tensor
        Batches (see the module docstring).
    handles : list of torch.utils.hooks.RemovableHandle
        The hooks gathering statistics; removed when the pass ends, on error too.
    forward_fn : callable, optional
        ``forward_fn(model, batch)``; :func:`default_forward` when ``None``.
    max_batches : int, optional
        Stop after this many batches.
    progress : str, optional
        Label of a progress bar; no bar when ``None``.
    empty_message : str
        The ``ValueError`` message when ``data`` yields no batch.

    Returns
    -------
    int
        The number of batches run.

    Raises
    ------
    ValueError
        When ``data`` yields no batch, or the model rejects a batch (its index is given).
    NonFiniteActivationError
        When a hook sees NaN or Inf (the batch index is added to the message).
    """
    forward_fn = forward_fn or default_forward
    batches = as_batches(data)
    total = batch_count(batches)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    device = model_device(model)
    was_training = model.training
    model.eval()
    count = 0
    try:
        with torch.no_grad():
            for count, batch in enumerate(tqdm(batches, total=total, desc=progress,
                                               disable=progress is None), start=1):
                run_batch(model, move_to(batch, device), forward_fn, batch_index(data, count - 1))
                if max_batches is not None and count >= max_batches:
                    break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError(empty_message or "data: the iterable yielded no batch.")
    return count


def batch_mask(batch):
    """Context manager: a dict batch's ``attention_mask`` as the active token mask
    (:mod:`rankwise.masks`) while the batch runs; nothing for any other batch."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return contextlib.nullcontext() if mask is None else masking(mask, "attention_mask")


def forward(model: nn.Module, batch, forward_fn=None):
    """``forward_fn(model, batch)`` (:func:`default_forward` when ``None``) under the batch's
    token mask (:func:`batch_mask`)."""
    with batch_mask(batch):
        return (forward_fn or default_forward)(model, batch)


def run_batch(model, batch, forward_fn, index: int):
    """:func:`forward`, its failures as errors naming ``data`` and the batch index."""
    try:
        return forward(model, batch, forward_fn)
    except (NonFiniteActivationError, TokenMaskError) as error:
        raise type(error)(f"data: batch {index}: {error}") from None
    except Exception as error:
        raise ValueError(f"data: the model rejected batch {index} "
                         f"({type(error).__name__}: {error}). Check that the batches are inputs the "
                         "model accepts, or pass forward_fn.") from error


def batch_index(data, position: int) -> int:
    """The index by which the user knows the batch at ``position`` of ``data``: its position,
    or ``data.original_index(position)`` for a part of the user's batches (:mod:`rankwise.holdout`)."""
    return data.original_index(position) if hasattr(data, "original_index") else position


def batch_count(data) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def as_call(example_input) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call on ``example_input`` (a tensor or ``PackedSequence``: one positional argument; a tuple or list: positional arguments; a dict: keyword arguments)."""
    if isinstance(example_input, torch.Tensor | PackedSequence):
        return (example_input,), {}
    if isinstance(example_input, tuple | list):
        return tuple(example_input), {}
    if isinstance(example_input, dict):
        return (), dict(example_input)
    raise TypeError(f"example_input: expected a tensor, a tuple or list of positional arguments "
                    f"or a dict of keyword arguments, got {type(example_input).__name__}.")



@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Context manager: ``module`` in eval mode, then every submodule's own train/eval mode back."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
