"""Measuring the speed of modules: wall-clock latency and FLOPs, before and after compression.

Fewer learnables (or FLOPs) do not always make a faster network: a factored layer runs two or
three smaller kernels instead of one, each with its own launch and memory traffic, and small
matrices use the hardware less well. These helpers measure what a user cares about on the
device they deploy to:

- :func:`median_latency`: the median wall-clock time of one forward pass;
- :func:`count_flops`: the floating-point operations of one forward pass, counted by
  ``torch.utils.flop_counter.FlopCounterMode``;
- :func:`compare_speed`: both, for an original and a compressed network, as a
  :class:`SpeedComparison` (FLOP reduction, realised speedup and their ratio).

Every measurement runs the module in eval mode under ``torch.inference_mode()`` and restores
the train/eval mode of each submodule afterwards. An example input is a tensor (or
``PackedSequence``), a tuple or list of positional arguments, or a dict of keyword arguments.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence


def median_latency(module: nn.Module, example_input, *, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall-clock seconds of one forward pass of ``module`` on ``example_input``.

    The module runs ``warmup`` times unmeasured (allocations, kernel selection, caches), then
    ``repeats`` times, each call timed alone with ``time.perf_counter``; the median of those
    times is returned (robust to the occasional slow call on a shared machine). Calls run in
    eval mode under ``torch.inference_mode()``; the train/eval mode of every submodule is
    restored afterwards. On a CUDA device, ``torch.cuda.synchronize`` is called before and
    after each timed call, so that the time covers the kernels' execution and not only their
    launch.

    Parameters
    ----------
    module : torch.nn.Module
        The module to time, on the device (and with the dtype) to measure.
    example_input : torch.Tensor, tuple, list or dict
        The input of one forward pass: a tensor (or ``PackedSequence``) is the single
        argument, a tuple or list the positional arguments, a dict the keyword arguments.
        Its batch size and device are those measured.
    repeats : int
        Timed calls (at least 1).
    warmup : int
        Untimed calls before them (at least 0).

    Returns
    -------
    float
        Seconds.

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(64, 64)
    >>> median_latency(layer, torch.randn(32, 64), repeats=5) > 0
    True
    """
    repeats = _check_count(repeats, "repeats", 1)
    warmup = _check_count(warmup, "warmup", 0)
    args, kwargs = as_call(example_input)
    device = device_of(module, example_input)
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else None
    times = []
    with eval_mode(module), torch.inference_mode():
        for _ in range(warmup):
            module(*args, **kwargs)
        for _ in range(repeats):
            if sync:
                sync()
            start = time.perf_counter()
            module(*args, **kwargs)
            if sync:
                sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(model: nn.Module, example_input) -> int:
    """Floating-point operations of one forward pass of ``model`` on ``example_input``.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (``display=False``), which knows
    the formulas of torch's matrix products and convolutions and counts **2 FLOPs per
    multiply-add** (so ``nn.Linear(20, 30)`` on a batch of 4 gives ``2 * 4 * 20 * 30 = 4800``).
    Operations it has no formula for count zero: element-wise operations, activations,
    normalisations, and torch's fused recurrent kernels (an ``nn.LSTM`` / ``nn.GRU`` counts
    zero on the CPU; a :class:`~rankwise.layers.ProjectedLSTM` on its factored path is
    counted through its matrix products). The model runs in eval mode under
    ``torch.inference_mode()``; the mode of each submodule is restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
    example_input : torch.Tensor, tuple, list or dict
        As for :func:`median_latency`.

    Returns
    -------
    int
        Total FLOPs (2 per multiply-add).
    """
    from torch.utils.flop_counter import FlopCounterMode  # imported here: ~75 ms off `import rankwise`

    args, kwargs = as_call(example_input)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.inference_mode(), counter:
        model(*args, **kwargs)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class SpeedComparison:
    """FLOPs and latency of one forward pass of an original and a compressed network.

    Attributes
    ----------
    flops_before, flops_after : int
        FLOPs of the original and the compressed network (:func:`count_flops`).
    seconds_before, seconds_after : float
        Their median latencies (:func:`median_latency`).
    device : str, optional
        The device measured, e.g. ``"cpu"`` or ``"cuda:0"``.
    """

    flops_before: int
    flops_after: int
    seconds_before: float
    seconds_after: float
    device: str | None = None

    @property
    def flop_reduction(self) -> float:
        """``flops_before / flops_after``: at least 1 when the compressed network has fewer."""
        return _ratio(self.flops_before, self.flops_after)

    @property
    def realised_speedup(self) -> float:
        """``seconds_before / seconds_after``: above 1 when the compressed network is faster."""
        return _ratio(self.seconds_before, self.seconds_after)

    @property
    def speedup_efficiency(self) -> float:
        """``realised_speedup / flop_reduction``: 1 when time falls as much as FLOPs do."""
        return _ratio(self.realised_speedup, self.flop_reduction)

    def __str__(self) -> str:
        where = f" on {self.device}" if self.device else ""
        return (f"FLOPs {_si(self.flops_before)} -> {_si(self.flops_after)} "
                f"({self.flop_reduction:.2f}x fewer), latency{where} "
                f"{format_seconds(self.seconds_before)} -> {format_seconds(self.seconds_after)} "
                f"({self.realised_speedup:.2f}x faster), speedup efficiency {self.speedup_efficiency:.2f}")


def compare_speed(original: nn.Module, compressed: nn.Module, example_input, *,
                  repeats: int = 20) -> SpeedComparison:
    """FLOPs and median latency of ``original`` and ``compressed`` on the same input.

    Parameters
    ----------
    original, compressed : torch.nn.Module
        The two networks, on the same device.
    example_input : torch.Tensor, tuple, list or dict
        One batch as deployed (its batch size and device are those measured); see
        :func:`median_latency`.
    repeats : int
        Timed calls per network (the median is kept).

    Returns
    -------
    SpeedComparison

    Examples
    --------
    >>> import torch, rankwise as rw
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> comparison = rw.compare_speed(model, model, torch.randn(32, 64), repeats=3)
    >>> comparison.flop_reduction
    1.0
    """
    device = device_of(original, example_input)
    return SpeedComparison(count_flops(original, example_input), count_flops(compressed, example_input),
                           median_latency(original, example_input, repeats=repeats),
                           median_latency(compressed, example_input, repeats=repeats),
                           None if device is None else str(device))


def as_call(example_input) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call on ``example_input`` (see :func:`median_latency`)."""
    if isinstance(example_input, torch.Tensor | PackedSequence):
        return (example_input,), {}
    if isinstance(example_input, tuple | list):
        return tuple(example_input), {}
    if isinstance(example_input, dict):
        return (), dict(example_input)
    raise TypeError(f"example_input: expected a tensor, a tuple or list of positional arguments "
                    f"or a dict of keyword arguments, got {type(example_input).__name__}.")


def input_device(example_input) -> torch.device | None:
    """The device of the first tensor in ``example_input`` (nested tuples, lists, dicts), if any."""
    if isinstance(example_input, torch.Tensor | PackedSequence):
        return example_input.data.device if isinstance(example_input, PackedSequence) else example_input.device
    items = (example_input.values() if isinstance(example_input, dict)
             else example_input if isinstance(example_input, tuple | list) else ())
    for item in items:
        device = input_device(item)
        if device is not None:
            return device
    return None


def module_device(module: nn.Module) -> torch.device | None:
    """The device of the first parameter (or buffer) of ``module``, if it has any."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return None


def format_seconds(seconds: float) -> str:
    """``"12.3 us"``, ``"4.56 ms"`` or ``"1.20 s"``."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def device_of(module: nn.Module, example_input) -> torch.device | None:
    """Where ``module`` runs on ``example_input``: its parameters' device, else the input's."""
    device = module_device(module)
    return input_device(example_input) if device is None else device


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


def _check_count(value, argument: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{argument}: expected an integer >= {minimum}, got {value!r}.")
    return int(value)


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0:
        return 1.0 if numerator == 0 else math.inf
    return numerator / denominator


def _si(count: int) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= factor:
            return f"{count / factor:.2f} {suffix}"
    return str(count)
