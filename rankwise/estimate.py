"""What NeuronPCA and the first compression will need in memory, predicted before they run.

:func:`estimate_cost` adds up, in bytes (``docs/cost.md`` writes the formulas out in widths,
depth and tokens):

- **weights**: the model's parameters and buffers;
- **statistics**, what ``NeuronPCA(model, data)`` keeps: each analysed layer's empty statistics
  as calibration allocates them (float64 moments of its gathered side: ``8 d_g^2`` for a Gram of
  width ``d_g``, the smaller side of a ``Linear``, both sides of a convolution), held twice when
  batches are held out (the statistics of every batch and of the fitted part), its copy of the
  weight (kept once, for the weight Grams), and with ``loss_fn`` the gradient moments
  (``8 d_out^2``) of the dense and embedding layers, once;
- **calibration**, on top of those while the pass runs: one batch's activations (every module's
  output, measured on one batch here; twice with a backward pass for the gradients) and the
  largest layer's batch Gram with its float64 copy;
- **decisions**, on top of the statistics during the first compression: the compressed copy of
  the model (at most the weights), every layer's spectrum (``8 d (k + 1)``, ``k`` the
  eigenvectors kept: ``min(d_in, d_out)`` for an expanding ``Linear``), and the largest
  layer's solver workspace (``3 x 8 d^2``).

``peak = weights + statistics + max(calibration, decisions)``: the memory rankwise adds to a
process that holds the model (the interpreter and libraries not counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from rankwise.batches import as_batches, batch_count, run_batch
from rankwise.kinds import kind_of
from rankwise.moments import Moments
from rankwise.statistics import statistics_for
from rankwise.statistics.calibration import gradient_layers
from rankwise.targets import select_layers

FLOAT64 = 8


@dataclass(frozen=True)
class CostEstimate:
    """Predicted memory, in bytes (see :mod:`rankwise.estimate` for each term).

    Attributes
    ----------
    weights_bytes, statistics_bytes, calibration_bytes, decisions_bytes, peak_bytes : int
    layers : dict of str to int
        Each analysed layer's share of ``statistics_bytes``.
    """

    weights_bytes: int
    statistics_bytes: int
    calibration_bytes: int
    decisions_bytes: int
    layers: dict[str, int] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        """``weights + statistics + max(calibration, decisions)``."""
        return self.weights_bytes + self.statistics_bytes + max(self.calibration_bytes, self.decisions_bytes)

    def __str__(self) -> str:
        gib = 2.0 ** 30
        return (f"estimated peak {self.peak_bytes / gib:.2f} GiB = weights {self.weights_bytes / gib:.2f} "
                f"+ statistics {self.statistics_bytes / gib:.2f} + max(calibration "
                f"{self.calibration_bytes / gib:.2f}, decisions {self.decisions_bytes / gib:.2f}) GiB "
                f"over {len(self.layers)} layers")


def estimate_cost(model: nn.Module, data, layer_names=None, exclude=None, forward_fn=None,
                  loss_fn="auto", validation="auto") -> CostEstimate:
    """Predict the memory of ``rw.NeuronPCA(model, data, ...)`` and the first
    ``rw.compress_network_using_projection`` on it, running only the first batch of ``data``.

    Parameters
    ----------
    model : torch.nn.Module
    data : iterable of batches
        As NeuronPCA takes it; only its first batch is run (forward, no gradients) and, when it
        has a length, its number of batches read (an iterator would lose its first batch: pass
        a list or a ``DataLoader``).
    layer_names, exclude, forward_fn, loss_fn, validation
        As for :class:`~rankwise.NeuronPCA`.

    Returns
    -------
    CostEstimate
    """
    layers = select_layers(model, layer_names, exclude)
    batches = as_batches(data)
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("data: no batch to estimate from; pass at least one calibration batch.")
    with_gradients = set(gradient_layers(layers)) if loss_fn is not None else set()
    gradients = bool(with_gradients)
    count = batch_count(batches)
    copies = 2 if validation == "auto" and (count is None or count >= 2) else 1
    per_layer, widths = {}, {}
    for name, layer in layers.items():
        stats = statistics_for(layer)
        per_layer[name] = _statistics_bytes(stats, layer, copies, name in with_gradients)
        widths[name] = stats.width
        del stats
    largest = FLOAT64 * max(widths.values(), default=0) ** 2
    activations = _activation_bytes(model, first, forward_fn)
    return CostEstimate(
        weights_bytes=sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())),
        statistics_bytes=sum(per_layer.values()),
        calibration_bytes=activations * (2 if gradients else 1) + 2 * largest,
        decisions_bytes=(sum(p.numel() * p.element_size() for p in model.parameters())
                         + sum(_spectrum_bytes(layers[name], widths[name]) for name in layers) + 3 * largest),
        layers=per_layer)


def _statistics_bytes(stats, layer: nn.Module, copies: int, gradients: bool) -> int:
    """What NeuronPCA keeps of ``layer`` (empty statistics ``stats``): ``copies`` of its moments,
    one copy of the weight (and bias) its statistics hold, its gradient moments when ``gradients``."""
    moments = kept = 0
    for f in fields(stats):
        value = getattr(stats, f.name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, Moments):
                moments += sum(t.numel() * FLOAT64 for t in item.tensors())
            elif isinstance(item, torch.Tensor):
                kept += item.numel() * item.element_size()
    out_width = kind_of(layer).weight(layer).shape[0]
    return copies * moments + kept + (FLOAT64 * (out_width ** 2 + out_width + 2) if gradients else 0)


def _spectrum_bytes(layer: nn.Module, width: int) -> int:
    """A layer's spectra as the decisions keep them: ``8 d (k + 1)`` per analysed side, ``d`` its
    width, ``k`` the eigenvectors kept (``min(d_in, d_out)`` for a ``Linear`` output side)."""
    if kind_of(layer).family != "dense":
        return 2 * FLOAT64 * width * (width + 1)
    out_width, in_width = kind_of(layer).weight(layer).shape[:2]
    kept = FLOAT64 * out_width * (min(in_width, out_width) + 1)
    return kept + (FLOAT64 * in_width * (in_width + 1) if "input" in kind_of(layer).sides else 0)


def _activation_bytes(model: nn.Module, batch, forward_fn) -> int:
    """Bytes of the distinct output tensors of every module on ``batch`` (one forward pass, no
    gradients; each kept alive until the pass ends, so that no storage is counted twice)."""
    seen = {}

    def count(module, args, output):
        for value in output if isinstance(output, (tuple, list)) else [output]:
            if isinstance(value, torch.Tensor):
                seen[value.untyped_storage().data_ptr()] = value

    handles = [module.register_forward_hook(count) for module in model.modules() if module is not model]
    try:
        with torch.no_grad():
            run_batch(model, batch, forward_fn, 0)
    finally:
        for handle in handles:
            handle.remove()
    return sum(value.untyped_storage().nbytes() for value in seen.values())
