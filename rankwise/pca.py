"""NeuronPCA: streaming activation statistics of a network's layers and their principal components.

For every projectable layer, one calibration pass accumulates, in float64, the moments of
its activation rows (``count n``, ``sum s = sum_t x_t``, ``square_sum = sum_t |x_t|^2`` and
``outer S = sum_t x_t x_t^T``), where a row is one channel vector: one sample of a
``Linear`` (all leading dimensions of an ``(N, T, D)`` input pooled), one spatial
position of a convolution, or one time step of a sequence for an LSTM or GRU layer (whose
statistics, per stacked layer and direction, are described in
:mod:`rankwise.recurrent_statistics`). Memory is ``O(d^2)`` per layer whatever the amount of
data, and moments of shards of the data simply add up (``merge``).

Convolutions get both sides' full moments. A ``Linear`` layer gets the full moments of its
output and only ``count``, ``sum`` and ``square_sum`` of its input: for ``y = W x + b`` the
output projection ``P P^T`` with ``P`` the top eigenvectors of ``W C_x W^T = C_y`` is the
best rank-``r`` approximation of the layer on the data (reduced-rank regression), and input
or both-sides projection at the same rank costs the same learnables, so they never win and
their ``n d_in^2`` statistics are not worth computing.

The covariance ``C = S / n - mu mu^T`` (``mu = s / n``) is then eigen-decomposed once per
layer and side. With thin data (``n`` not much larger than the width ``d``) the sample
covariance is rank-deficient and a projection would delete every direction the data did
not show, so both sides are shrunk toward what isotropic inputs of the same power would
give::

    C_x,reg = (1 - alpha) C_x + alpha s I,          s = tr(C_x) / d_in
    C_y,reg = (1 - alpha) C_y + alpha s W W^T,      alpha = d / (n + d)  ("auto")

with ``W`` matricised as ``(out, in * kernel)`` and ``d`` the largest analysed width
(``d_out`` for a ``Linear`` layer, ``max(d_in, d_out)`` for a convolution). For a ``Linear``
layer ``C_y,reg = W C_x,reg W^T`` exactly, so both sides stay consistent. As ``n / d``
shrinks, the output principal directions tend to the left singular vectors of ``W``:
projection degrades toward data-free truncated SVD instead of collapsing.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, fields

import torch
from torch import nn

from rankwise.batches import run_batches
from rankwise.checks import check_max_batches, check_regularization, check_verbosity
from rankwise.kinds import kind_named, kind_of
from rankwise.learnables import count_learnables
from rankwise.moments import Moments, NonFiniteActivationError, Spectrum
from rankwise.recurrent_statistics import RecurrentStatistics, recurrent_hook
from rankwise.targets import select_layers

SIDES = ("input", "output")
FORMAT_VERSION = 1


class ThinDataWarning(UserWarning):
    """A layer saw fewer observations than its width: its statistics are regularised."""


@dataclass
class LayerStatistics:
    """What NeuronPCA knows about one layer: its shape, both sides' moments, weight Grams.

    ``weight_gram_input = sum_k W_k^T W_k`` (``in x in``, summed over kernel positions; ``None``
    for a ``Linear`` layer, whose input side is not analysed) lets the input side be judged in
    the output space, ``|W q|^2 = q^T weight_gram_input q``;
    ``weight_gram_output = W W^T`` (``out x out``, ``W`` as ``(out, in * kernel)``) is the
    output covariance that isotropic unit inputs would give, the regularisation's prior.
    """

    kind: str
    in_channels: int
    out_channels: int
    kernel_numel: int
    bias: bool
    input: Moments
    output: Moments
    weight_gram_input: torch.Tensor | None
    weight_gram_output: torch.Tensor

    @classmethod
    def for_layer(cls, layer: nn.Module) -> "LayerStatistics":
        w = layer.weight.detach()
        out_c, in_c = w.shape[:2]
        linear = "input" not in kind_of(layer).sides
        per_position = w.reshape(out_c, in_c, -1).permute(2, 0, 1)  # (kernel, out, in)
        gram_input = None if linear else torch.einsum("koi,koj->ij", per_position, per_position)
        gram_output = w.reshape(out_c, -1) @ w.reshape(out_c, -1).T
        return cls(kind_of(layer).name, in_c, out_c, per_position.shape[0], layer.bias is not None,
                   Moments.zeros(in_c, w.device, outer=not linear), Moments.zeros(out_c, w.device),
                   None if linear else gram_input.to(torch.float64), gram_output.to(torch.float64))

    @property
    def width(self) -> int:
        """Largest dimension among the analysed sides (a Linear layer's input is not analysed)."""
        return self.out_channels if self.input.outer is None else max(self.in_channels, self.out_channels)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_channels, in_channels)``."""
        return self.out_channels, self.in_channels

    def moments(self, side: str) -> Moments:
        return self.input if side == "input" else self.output

    def __add__(self, other: "LayerStatistics") -> "LayerStatistics":
        if self.shape != other.shape:
            raise ValueError("the two statistics describe layers of different shapes")
        return LayerStatistics(**{**vars(self), "input": self.input + other.input,
                                  "output": self.output + other.output})


class NeuronPCA:
    """Principal component analysis of the activations of every projectable layer.

    PyTorch counterpart of MATLAB's ``neuronPCA``. One calibration pass over ``data`` with
    forward hooks on every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``,
    ``nn.LSTM`` and ``nn.GRU`` (or those named in ``layer_names``) accumulates the moments of
    each layer's input and output (of every stacked layer and direction of a recurrent layer:
    :mod:`rankwise.recurrent_statistics`); the eigen-decomposition is done once, on first use.
    See the module docstring for the mathematics.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network. It runs in eval mode under ``torch.no_grad()``; its training
        flag is restored afterwards and it is not otherwise changed.
    data : iterable or torch.Tensor
        Batches: a ``DataLoader``, a list of tensors, ... A tensor (or ``PackedSequence``)
        batch is the input; a tuple or list is ``(inputs, targets...)``; a dict is passed as
        keyword arguments. A single tensor ``data`` is one batch. Variable-length sequences
        are best given as ``PackedSequence`` batches (or one sequence per batch): padding
        would enter the statistics.
    layer_names : str or list of str, optional
        Qualified names of the layers to analyse; all projectable layers when ``None``.
    verbosity : {"off", "summary", "steps", "iterations"}
        ``"off"`` prints nothing and shows no progress bar.
    forward_fn : callable, optional
        ``forward_fn(model, batch)`` runs one batch, for anything the rules above miss.
    max_batches : int, optional
        Stop after this many batches.
    regularization : "auto" or float
        Shrinkage ``alpha`` in ``[0, 1]`` toward the weights' spectrum, or ``"auto"`` for
        ``alpha = d / (n + d)`` per layer (``n`` observations, ``d`` its largest analysed width).

    Attributes
    ----------
    layer_names : list of str
        Layers analysed, in model order.
    num_batches : int
        Batches seen.
    """

    def __init__(self, model: nn.Module, data, layer_names=None, verbosity: str = "summary",
                 forward_fn=None, max_batches: int | None = None, regularization="auto"):
        check_verbosity(verbosity)
        check_regularization(regularization)
        check_max_batches(max_batches)
        layers = select_layers(model, layer_names)
        self._init_state({name: _statistics_for(m) for name, m in layers.items()},
                         count_learnables(model), regularization)
        start = time.perf_counter()
        self.num_batches = _calibrate(model, data, layers, self._stats, forward_fn, max_batches,
                                      show_progress=verbosity != "off")
        self._check_observations()
        if verbosity != "off":
            low, high = self.learnables_reduction_range
            print(f"NeuronPCA: {len(self.layer_names)} layers, {self.num_batches} batches, "
                  f"{time.perf_counter() - start:.1f} s; learnables reduction range "
                  f"{low:.1%} to {high:.1%}")

    def _init_state(self, stats: dict, network_learnables: int, regularization, num_batches=0):
        self._stats = stats
        self.network_learnables = network_learnables
        self._regularization = regularization
        self.num_batches = num_batches
        self._spectra = {}

    @property
    def layer_names(self) -> list[str]:
        return list(self._stats)

    @property
    def regularization(self):
        """The shrinkage setting: ``"auto"`` or a float in ``[0, 1]``."""
        return self._regularization

    def statistics(self, name: str) -> LayerStatistics | RecurrentStatistics:
        """Moments and weight Grams of layer ``name``."""
        if name not in self._stats:
            raise KeyError(f"{name!r} was not analysed. Analysed layers: {', '.join(self._stats)}.")
        return self._stats[name]

    def spectrum(self, name: str, side: str = "output", cell: str | None = None) -> Spectrum:
        """Eigenvalues (descending) and eigenvectors of the regularised covariance.

        Parameters
        ----------
        name : str
            An analysed layer.
        side : {"input", "output"}
            For a recurrent layer, ``"output"`` is the hidden state ``h_t``.
        cell : str, optional
            For a recurrent layer, the stacked layer and direction (``"l0"``, ``"l0_reverse"``,
            ``"l1"``, ...); may be omitted when there is only one.
        """
        if side not in SIDES:
            raise ValueError(f"side: expected 'input' or 'output', got {side!r}.")
        stats = self.statistics(name)
        if isinstance(stats, RecurrentStatistics):
            key = (name, side, stats.resolve_cell(cell))
            if key not in self._spectra:
                self._spectra[key] = stats.spectrum(side, key[2], self._regularization)
            return self._spectra[key]
        if cell is not None:
            raise ValueError(f"cell: layer {name!r} is not recurrent; only LSTM and GRU layers "
                             "have cells.")
        if stats.moments(side).outer is None:
            raise ValueError(f"side: layer {name!r} is a Linear layer, whose input side is not "
                             "analysed (output projection is optimal for it); use side='output'.")
        key = (name, side)
        if key not in self._spectra:
            self._spectra[key] = _decompose(stats, side, self._regularization)
        return self._spectra[key]

    @property
    def learnables_reduction_range(self) -> tuple[float, float]:
        """``(min, max)`` fraction of the network's learnables that projection can remove.

        ``min`` is what goes without losing any variance, ``max`` what goes with every
        analysed layer at its smallest useful factored form.
        """
        from rankwise.ranks import reduction_range  # decisions live downstream of statistics

        return reduction_range(self)

    def merge(self, other: "NeuronPCA") -> "NeuronPCA":
        """Statistics of the union of both calibration sets (moments add up).

        Both must cover the same layers with the same shapes.
        """
        if self.layer_names != other.layer_names:
            raise ValueError("merge: both NeuronPCA must analyse the same layers, in the same order.")
        merged = {}
        for name, mine in self._stats.items():
            theirs = other._stats[name]
            if type(mine) is not type(theirs) or mine.shape != theirs.shape:
                raise ValueError(f"merge: layer {name!r} has different shapes in the two NeuronPCA.")
            merged[name] = mine + theirs
        result = NeuronPCA.__new__(NeuronPCA)
        result._init_state(merged, self.network_learnables, self._regularization,
                           self.num_batches + other.num_batches)
        return result

    def save(self, path) -> None:
        """Write the statistics to ``path`` (plain tensors; load with :meth:`load`)."""
        layers = {name: {f.name: _plain(getattr(s, f.name)) for f in fields(s)}
                  for name, s in self._stats.items()}
        torch.save({"format_version": FORMAT_VERSION, "layers": layers,
                    "network_learnables": self.network_learnables,
                    "regularization": self._regularization, "num_batches": self.num_batches}, path)

    @classmethod
    def load(cls, path) -> "NeuronPCA":
        """Read statistics written by :meth:`save` (no arbitrary code is unpickled)."""
        state = torch.load(path, weights_only=True, map_location="cpu")
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a NeuronPCA file of format version {FORMAT_VERSION}.")
        stats = {name: _restore(d) for name, d in state["layers"].items()}
        npca = cls.__new__(cls)
        npca._init_state(stats, state["network_learnables"], state["regularization"],
                         state["num_batches"])
        return npca

    def __repr__(self) -> str:
        return f"NeuronPCA({len(self._stats)} layers, {self.num_batches} batches)"

    def _check_observations(self) -> None:
        for name, stats in self._stats.items():
            count = int(stats.input.count)
            if count < 2:
                raise ValueError(f"data: layer {name!r} saw {count} observation(s); at least 2 are "
                                 "needed for a covariance. Pass more or larger batches.")
            width = stats.width
            if count < width:
                warnings.warn(f"layer {name!r} saw {count} observations for a width of {width}: its "
                              "covariance is rank-deficient and is regularised toward the spectrum "
                              "of its weights. More calibration data gives better projections.",
                              ThinDataWarning, stacklevel=3)


def _statistics_for(layer: nn.Module) -> LayerStatistics | RecurrentStatistics:
    kind = kind_of(layer)
    if kind.family == "recurrent":
        return RecurrentStatistics.for_layer(layer, kind.name)
    return LayerStatistics.for_layer(layer)


def _plain(value):
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Moments):
        return {f.name: getattr(value, f.name) for f in fields(value)}
    return value


def _restore(plain: dict) -> LayerStatistics | RecurrentStatistics:
    """Statistics from their :func:`_plain` form."""
    if kind_named(plain["kind"]).family == "recurrent":
        return RecurrentStatistics(**{**plain, "input": Moments(**plain["input"]),
                                      "outputs": [Moments(**m) for m in plain["outputs"]]})
    return LayerStatistics(**{**plain, "input": Moments(**plain["input"]),
                              "output": Moments(**plain["output"])})


def _decompose(stats: LayerStatistics, side: str, regularization) -> Spectrum:
    moments = stats.moments(side)
    cov = moments.covariance
    width = stats.width
    alpha = width / (float(moments.count) + width) if regularization == "auto" else float(regularization)
    prior = (torch.eye(len(cov), dtype=cov.dtype, device=cov.device) if side == "input"
             else stats.weight_gram_output)
    return Spectrum.shrunk(cov, moments.mean, alpha, stats.input.power * prior)


def _calibrate(model, data, layers, stats, forward_fn, max_batches, show_progress) -> int:
    """Run the batches through ``model`` with hooks filling ``stats``; return the batch count."""
    handles = [layer.register_forward_hook(
        recurrent_hook(name, stats[name]) if isinstance(stats[name], RecurrentStatistics)
        else _hook(name, layer, stats[name]), with_kwargs=True) for name, layer in layers.items()]
    return run_batches(model, data, handles, forward_fn, max_batches,
                       progress="NeuronPCA" if show_progress else None,
                       empty_message="data: the iterable yielded no batch. Pass a DataLoader or a "
                                     "list of tensors holding representative inputs.")


def _hook(name: str, layer: nn.Module, stats: LayerStatistics):
    spatial_dims = layer.weight.dim() - 2

    def channel_rows(t: torch.Tensor) -> torch.Tensor:
        if stats.kind == "linear":
            return t.reshape(-1, t.shape[-1])
        channel_dim = 1 if t.dim() == spatial_dims + 2 else 0  # batched or unbatched
        return t.movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim])

    def update(side: str, t: torch.Tensor) -> None:
        try:
            stats.moments(side).update(channel_rows(t.detach()))
        except NonFiniteActivationError:
            raise NonFiniteActivationError(f"layer {name!r} has NaN or Inf in its {side} activations; "
                                           "check the data and the model's weights.") from None

    def hook(module, args, kwargs, output):
        update("input", args[0] if args else next(iter(kwargs.values())))
        update("output", output)

    return hook
