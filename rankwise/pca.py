"""NeuronPCA: the activation statistics of a network's layers, gathered in one calibration pass.

:class:`NeuronPCA` is the plumbing around the per-kind statistics of :mod:`rankwise.statistics`:
it selects the layers (:mod:`rankwise.targets`), registers one forward hook per layer (the
statistics class of its kind's family makes it), runs the batches (:mod:`rankwise.batches`),
and caches the regularised spectra on first use. Statistics of shards of the data add up
(:meth:`NeuronPCA.merge`) and are written as plain tensors (:meth:`NeuronPCA.save`).

Calibration costs one forward pass over the data plus ``O(n d^2)`` per layer for the moments;
the eigendecompositions (``O(d^3)`` per side) and the rank decisions behind
:attr:`NeuronPCA.learnables_reduction_range` run only when something asks for them.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from rankwise.batches import run_batches
from rankwise.checks import check_max_batches, check_regularization, check_verbosity
from rankwise.learnables import count_learnables
from rankwise.moments import NonFiniteActivationError, Spectrum
from rankwise.statistics import Statistics, from_plain, statistics_for, to_plain
from rankwise.targets import select_layers

SIDES = ("input", "output")
FORMAT_VERSION = 1
"""Version of the :meth:`NeuronPCA.save` file layout; files of every version up to it load."""
READABLE_VERSIONS = tuple(range(1, FORMAT_VERSION + 1))
PROGRESS_DELAY_SECONDS = 1.0
"""The spectra's progress bar appears only once computing them has taken this long."""
__all__ = ["NeuronPCA", "NonFiniteActivationError", "ThinDataWarning"]


class ThinDataWarning(UserWarning):
    """A layer saw fewer observations than its width: its statistics are regularised."""


class NeuronPCA:
    """Principal component analysis of the activations of every projectable layer.

    PyTorch counterpart of MATLAB's ``neuronPCA``. One calibration pass over ``data`` with
    forward hooks on every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``,
    ``nn.LSTM`` and ``nn.GRU`` (or those selected by ``layer_names`` and ``exclude``)
    accumulates the moments of each layer's input and output: per channel vector for dense
    layers (:mod:`rankwise.statistics.dense`), per stacked layer and direction for recurrent
    ones (:mod:`rankwise.statistics.recurrent`). The regularised eigen-decomposition of each
    side (:mod:`rankwise.statistics.spectra`) is done once, on first use.

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
        The layers to analyse, by qualified name, glob pattern (``"features.*"``) or
        ``"re:"``-prefixed regular expression (:mod:`rankwise.targets`); all projectable
        layers when ``None``.
    verbosity : {"off", "summary", "steps", "iterations"}
        ``"off"`` prints nothing and shows no progress bar; ``"summary"`` shows the
        calibration's progress bar and one line (layers, batches, seconds); ``"steps"`` and
        ``"iterations"`` then also compute :attr:`learnables_reduction_range` and print it
        with the time its spectra and rank decisions took (a progress bar over the spectra
        appears when they take over a second).
    forward_fn : callable, optional
        ``forward_fn(model, batch)`` runs one batch, for anything the rules above miss.
    max_batches : int, optional
        Stop after this many batches.
    regularization : "auto" or float
        Shrinkage ``alpha`` in ``[0, 1]`` toward the weights' spectrum, or ``"auto"`` for
        ``alpha = d / (n + d)`` per layer (``n`` observations, ``d`` its largest analysed width).
    exclude : str or list of str, optional
        Names or patterns of layers not to analyse.

    Attributes
    ----------
    layer_names : list of str
        Layers analysed, in model order.
    num_batches : int
        Batches seen.
    """

    def __init__(self, model: nn.Module, data, layer_names=None, verbosity: str = "summary",
                 forward_fn=None, max_batches: int | None = None, regularization="auto",
                 exclude=None):
        check_verbosity(verbosity)
        check_regularization(regularization)
        check_max_batches(max_batches)
        layers = select_layers(model, layer_names, exclude)
        self._init_state({name: statistics_for(m) for name, m in layers.items()},
                         count_learnables(model), regularization)
        start = time.perf_counter()
        self.num_batches = _calibrate(model, data, layers, self._stats, forward_fn, max_batches,
                                      show_progress=verbosity != "off")
        seconds = time.perf_counter() - start
        self._check_observations()
        if verbosity != "off":
            print(f"NeuronPCA: {len(self.layer_names)} layers, {self.num_batches} batches, "
                  f"{seconds:.1f} s calibration{self._range_note(verbosity)}")

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

    def statistics(self, name: str) -> Statistics:
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
        key = (name, side, stats.resolve_request(name, side, cell))
        if key not in self._spectra:
            self._spectra[key] = stats.spectrum(side, key[2], self._regularization)
        return self._spectra[key]

    @property
    def learnables_reduction_range(self) -> tuple[float, float]:
        """``(min, max)`` fraction of the network's learnables that projection can remove.

        ``min`` is what goes without losing any variance, ``max`` what goes with every
        analysed layer at its smallest useful factored form.
        """
        from rankwise.ranks import reduction_range  # decisions live downstream of statistics

        return reduction_range(self)

    def _range_note(self, verbosity: str) -> str:
        """The end of the summary line: at ``"summary"``, where the range is; above, the range,
        computed and timed apart (a progress bar over the spectra when they are slow)."""
        if verbosity == "summary":
            return " (npca.learnables_reduction_range: what projection can remove)"
        start = time.perf_counter()
        keys = [(name, side, cell) for name, stats in self._stats.items()
                for side, cell in stats.spectra_keys()]
        for key in tqdm(keys, desc="NeuronPCA spectra", delay=PROGRESS_DELAY_SECONDS, leave=False):
            self.spectrum(*key)
        low, high = self.learnables_reduction_range
        return (f"; learnables reduction range {low:.1%} to {high:.1%} "
                f"({time.perf_counter() - start:.1f} s for the spectra and rank decisions)")

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
        layers = {name: to_plain(stats) for name, stats in self._stats.items()}
        torch.save({"format_version": FORMAT_VERSION, "layers": layers,
                    "network_learnables": self.network_learnables,
                    "regularization": self._regularization, "num_batches": self.num_batches}, path)

    @classmethod
    def load(cls, path) -> "NeuronPCA":
        """Read statistics written by :meth:`save` (no arbitrary code is unpickled)."""
        state = torch.load(path, weights_only=True, map_location="cpu")
        version = state.get("format_version") if isinstance(state, dict) else None
        if version not in READABLE_VERSIONS:
            raise ValueError(f"path: {path} is not a NeuronPCA file of format version "
                             f"{', '.join(map(str, READABLE_VERSIONS))} (found {version!r}).")
        stats = {name: from_plain(plain) for name, plain in state["layers"].items()}
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


def _calibrate(model, data, layers, stats, forward_fn, max_batches, show_progress) -> int:
    """Run the batches through ``model`` with hooks filling ``stats``; return the batch count."""
    handles = [layer.register_forward_hook(stats[name].hook(name, layer), with_kwargs=True)
               for name, layer in layers.items()]
    return run_batches(model, data, handles, forward_fn, max_batches,
                       progress="NeuronPCA" if show_progress else None,
                       empty_message="data: the iterable yielded no batch. Pass a DataLoader or a "
                                     "list of tensors holding representative inputs.")
