"""Measuring the speed of modules: wall-clock latency and FLOPs, before and after compression.

Fewer learnables (or FLOPs) do not always make a faster network: a factored layer runs two or
three smaller kernels instead of one, each with its own launch and memory traffic, and small
matrices use the hardware less well. These helpers measure what a user cares about on the
device they deploy to:

- :func:`median_latency`: the median wall-clock time of one forward pass;
- :func:`~rankwise.flops.count_flops` (:mod:`rankwise.flops`): the floating-point operations
  of one forward pass;
- :func:`compare_speed`: both, for an original and a compressed network, as a
  :class:`SpeedComparison` (FLOP reduction, realised speedup and their ratio), timed in
  alternating rounds until the timings settle, and marked unreliable when they do not.

Every measurement runs the module in eval mode under ``torch.inference_mode()`` and restores
the train/eval mode of each submodule afterwards. An example input is a tensor (or
``PackedSequence``), a tuple or list of positional arguments, or a dict of keyword arguments.
"""

from __future__ import annotations

import math
import numbers
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from rankwise.batches import as_call, eval_mode
from rankwise.flops import count_flops


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
    return statistics.median(latency_samples(module, example_input, repeats=repeats, warmup=warmup))


def latency_samples(module: nn.Module, example_input, *, repeats: int = 20, warmup: int = 3) -> list[float]:
    """Wall-clock seconds of ``repeats`` forward passes, each timed alone, after ``warmup`` untimed ones.

    What :func:`median_latency` takes the median of; same arguments, mode handling and CUDA
    synchronisation.

    Returns
    -------
    list of float
        Seconds, in the order the calls ran.
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
    return times


STABLE_DRIFT = 0.05
"""Timings are stable when the medians of two successive rounds differ by at most this fraction."""
WIDE_SPREAD = 0.25
"""A round whose interquartile range exceeds this fraction of its median is not stable."""


class UnstableTimingWarning(RuntimeWarning):
    """The latencies :func:`compare_speed` measured did not settle: their ratio is unreliable."""


@dataclass(frozen=True)
class SpeedComparison:
    """FLOPs and latency of one forward pass of an original and a compressed network.

    Attributes
    ----------
    flops_before, flops_after : int
        FLOPs of the original and the compressed network (:func:`count_flops`).
    seconds_before, seconds_after : float
        Their median latencies in the last round of timing (see :func:`compare_speed`).
    device : str, optional
        The device measured, e.g. ``"cpu"`` or ``"cuda:0"``.
    spread_before, spread_after : float, optional
        Interquartile range of each network's timings in that round, as a fraction of its median.
    stable : bool
        Whether the timings settled (see :func:`compare_speed`); when not, the speedup and the
        efficiency are unreliable and ``str`` says so.
    rounds : int, optional
        Timing rounds run, the warm-up round not counted.
    """

    flops_before: int
    flops_after: int
    seconds_before: float
    seconds_after: float
    device: str | None = None
    spread_before: float | None = None
    spread_after: float | None = None
    stable: bool = True
    rounds: int | None = None

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
        spread = ("" if self.spread_before is None else
                  f", spread {self.spread_before:.0%} / {self.spread_after:.0%}")
        line = (f"FLOPs {_si(self.flops_before)} -> {_si(self.flops_after)} "
                f"({_times(self.flop_reduction, 'fewer FLOPs', 'more FLOPs')}), latency{where} "
                f"{format_seconds(self.seconds_before)} -> {format_seconds(self.seconds_after)} "
                f"({_times(self.realised_speedup, 'faster', 'slower')}{spread}), "
                f"speedup efficiency {self.speedup_efficiency:.2f}")
        if self.stable:
            return line
        return (f"{line}; UNSTABLE timings (not settled after {self.rounds} rounds): the speed ratio "
                f"and the efficiency are unreliable")


def compare_speed(original: nn.Module, compressed: nn.Module, example_input, *,
                  repeats: int = 20, max_rounds: int = 10) -> SpeedComparison:
    """FLOPs and latency of ``original`` and ``compressed`` on the same input, timed until stable.

    The first calls of a network are slow (allocations, kernel selection, lazy initialisation),
    and a shared machine adds noise, so one median is not a measurement. Both networks first
    run one untimed warm-up round of ``repeats + 3`` calls; then rounds of ``repeats`` timed
    calls each (:func:`latency_samples`) alternate between them, so that drift hits both alike.
    The timings are *stable* once, for both networks, the median of a round differs from the
    previous round's by at most ``STABLE_DRIFT`` (5%) and the round's interquartile range is at
    most ``WIDE_SPREAD`` (25%) of its median; the last round's medians and spreads are
    reported. When ``max_rounds`` rounds pass without that, the comparison is marked unstable,
    its ``str`` says the ratio is unreliable, and an :class:`UnstableTimingWarning` is issued.

    Parameters
    ----------
    original, compressed : torch.nn.Module
        The two networks, on the same device.
    example_input : torch.Tensor, tuple, list or dict
        One batch as deployed (its batch size and device are those measured); see
        :func:`median_latency`.
    repeats : int
        Timed calls per network and round.
    max_rounds : int
        Timing rounds at most (at least 2: stability compares two rounds).

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
    repeats = _check_count(repeats, "repeats", 1)
    max_rounds = _check_count(max_rounds, "max_rounds", 2)
    device = device_of(original, example_input)
    flops = count_flops(original, example_input), count_flops(compressed, example_input)
    (before, after), rounds, stable = _settled_timings((original, compressed), example_input,
                                                       repeats, max_rounds)
    comparison = SpeedComparison(*flops, statistics.median(before), statistics.median(after),
                                 None if device is None else str(device), _spread(before),
                                 _spread(after), stable, rounds)
    if not stable:
        warnings.warn(str(comparison), UnstableTimingWarning, stacklevel=2)
    return comparison


def _settled_timings(modules, example_input, repeats: int, max_rounds: int):
    """``(samples of the last round per module, rounds run, stable)``; see :func:`compare_speed`."""
    for module in modules:
        latency_samples(module, example_input, repeats=repeats, warmup=3)
    previous = None
    for rounds in range(1, max_rounds + 1):
        samples = [latency_samples(module, example_input, repeats=repeats, warmup=0) for module in modules]
        medians = [statistics.median(times) for times in samples]
        if previous is not None and all(
                abs(now - before) <= STABLE_DRIFT * before and _spread(times) <= WIDE_SPREAD
                for now, before, times in zip(medians, previous, samples)):
            return samples, rounds, True
        previous = medians
    return samples, max_rounds, False


def _spread(times: list[float]) -> float:
    """Interquartile range of ``times`` over their median (0 for fewer than two)."""
    if len(times) < 2:
        return 0.0
    first, _, third = statistics.quantiles(times, n=4)
    return _ratio(third - first, statistics.median(times))


def _times(ratio: float, smaller: str, larger: str) -> str:
    """``"1.33x fewer FLOPs"`` for ``ratio = before / after = 1.33``, ``"1.33x more FLOPs"`` for 0.75."""
    if ratio >= 1:
        return f"{ratio:.2f}x {smaller}"
    return f"{1 / ratio:.2f}x {larger}" if ratio > 0 else f"{larger}, from none"


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
