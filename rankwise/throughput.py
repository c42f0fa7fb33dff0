"""Tokens per second of a causal language model, original against compressed: prefill and decode.

A language model is used in two regimes that stress the hardware differently:

- **prefill**: the prompt, ``B`` sequences of ``T`` tokens, in one forward pass that fills the
  key/value cache: ``B x T`` rows through every ``Linear`` at once (matrix-matrix products; a
  factored layer's smaller products can pay off);
- **decode**: then one new token per sequence per step, reading the cache: ``B`` rows per step
  (matrix-vector products, bound by reading the weights from memory; fewer weights to read is
  what a factored layer offers here).

:func:`compare_generation_speed` measures both for an original and a compressed model on the same
prompt, as :func:`rankwise.compare_speed` does for one forward pass: untimed warm-up calls, then
``repeats`` timed measurements alternating between the two models (so that a shared machine's
drift hits both alike), and the medians. Prefill throughput is ``B T / t_prefill`` (computing the
logits of the last position only, as ``generate()`` does, where the model offers
``logits_to_keep``); decode
throughput is ``B n / t_decode`` for ``n`` greedy steps after an untimed prefill (each step feeds
the arg-max token with the cache). Everything runs in eval mode under ``torch.inference_mode()``.

The model is called as a Hugging Face causal LM: ``model(input_ids=..., cache=...,
use_cache=True)`` returning ``.logits`` and ``.cache`` (``past_key_values`` in both places for a
``forward`` without a ``cache`` argument, as before transformers 5.24).
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.batches import eval_mode
from rankwise.latency import _check_count, _times


@dataclass(frozen=True)
class GenerationSpeed:
    """Median prefill and decode throughput (tokens per second) of an original and a compressed model.

    Attributes
    ----------
    batch_size, prompt_tokens, new_tokens : int
        ``B``, ``T`` and the decode steps ``n`` measured.
    prefill_before, prefill_after : float
        Prefill tokens per second, ``B T / t``, of the original and the compressed model.
    decode_before, decode_after : float
        Decode tokens per second, ``B n / t``.
    threads : int
        ``torch.get_num_threads()`` during the measurement.
    """

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    prefill_before: float
    prefill_after: float
    decode_before: float
    decode_after: float
    threads: int

    @property
    def prefill_speedup(self) -> float:
        """``prefill_after / prefill_before``: above 1 when the compressed model prefills faster."""
        return self.prefill_after / self.prefill_before

    @property
    def decode_speedup(self) -> float:
        """``decode_after / decode_before``: above 1 when the compressed model decodes faster."""
        return self.decode_after / self.decode_before

    def __str__(self) -> str:
        return (f"batch {self.batch_size}, {self.prompt_tokens}-token prompt, {self.threads} thread(s): prefill "
                f"{self.prefill_before:,.0f} -> {self.prefill_after:,.0f} tokens/s "
                f"({_times(self.prefill_speedup, 'faster', 'slower')}), decode {self.decode_before:,.1f} -> "
                f"{self.decode_after:,.1f} tokens/s over {self.new_tokens} steps "
                f"({_times(self.decode_speedup, 'faster', 'slower')})")


def compare_generation_speed(original: nn.Module, compressed: nn.Module, input_ids: torch.Tensor, *,
                             new_tokens: int = 16, repeats: int = 5, warmup: int = 1) -> GenerationSpeed:
    """Prefill and decode tokens per second of ``original`` and ``compressed`` (see the module docstring).

    Parameters
    ----------
    original, compressed : torch.nn.Module
        Causal language models on the same device.
    input_ids : torch.Tensor
        The prompt, ``(B, T)`` token ids on that device: ``B`` is the batch size measured.
    new_tokens : int
        Decode steps per measurement (at least 1).
    repeats : int
        Timed measurements of each regime per model (the median is kept).
    warmup : int
        Untimed prefill-and-decode runs of each model first.

    Returns
    -------
    GenerationSpeed

    Raises
    ------
    ValueError
        For ``input_ids`` that is not a ``(B, T)`` integer tensor, or counts below their minimum.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids: expected a (batch, tokens) tensor of token ids, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}.")
    new_tokens, repeats = _check_count(new_tokens, "new_tokens", 1), _check_count(repeats, "repeats", 1)
    warmup = _check_count(warmup, "warmup", 0)
    models = (original, compressed)
    samples = {model: ([], []) for model in models}
    with eval_mode(original), eval_mode(compressed), torch.inference_mode():
        for _ in range(warmup):
            for model in models:
                _decode_seconds(model, input_ids, new_tokens)
        for _ in range(repeats):
            for model in models:
                samples[model][0].append(_prefill_seconds(model, input_ids)[0])
                samples[model][1].append(_decode_seconds(model, input_ids, new_tokens))
    batch, tokens = input_ids.shape
    (prefill_before, decode_before), (prefill_after, decode_after) = (
        (batch * tokens / statistics.median(samples[m][0]), batch * new_tokens / statistics.median(samples[m][1]))
        for m in models)
    return GenerationSpeed(batch, tokens, new_tokens, prefill_before, prefill_after, decode_before, decode_after,
                           torch.get_num_threads())


def _prefill_seconds(model: nn.Module, input_ids: torch.Tensor):
    """``(seconds, outputs)`` of one prefill pass filling a fresh cache (the logits of the last
    position only where the model's ``forward`` offers ``logits_to_keep``, as ``generate()`` asks)."""
    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    start = time.perf_counter()
    outputs = model(input_ids=input_ids, use_cache=True, **last)
    return time.perf_counter() - start, outputs


def _decode_seconds(model: nn.Module, input_ids: torch.Tensor, steps: int) -> float:
    """Seconds of ``steps`` greedy single-token steps after an untimed prefill."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    _, outputs = _prefill_seconds(model, input_ids)
    start = time.perf_counter()
    for _ in range(steps):
        token = outputs.logits[:, -1:].argmax(-1)
        outputs = model(input_ids=token, use_cache=True, **{name: getattr(outputs, name)})
    return time.perf_counter() - start
