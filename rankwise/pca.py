"""NeuronPCA: the activation statistics of a network's layers, gathered in one calibration pass.

:class:`NeuronPCA` is the plumbing around the per-kind statistics of :mod:`rankwise.statistics`:
it selects the layers (:mod:`rankwise.targets`), registers one forward hook per layer (the
statistics class of its kind's family makes it), runs the batches (:mod:`rankwise.batches`),
and caches the regularised spectra on first use. Statistics of shards of the data add up
(:meth:`NeuronPCA.merge`) and are written as plain tensors (:meth:`NeuronPCA.save`).

Calibration costs one forward pass over the data plus ``O(n d^2)`` per layer for the moments
(``d`` the smaller side of a ``Linear`` layer, one Gram for layers reading the same tensor:
:mod:`rankwise.statistics.dense`);
with ``loss_fn`` the same pass also runs one backward pass per batch for the gradient statistics
of the loss criterion (:mod:`rankwise.statistics.gradients`). The eigendecompositions
(``O(d^3)`` per side) and the rank decisions behind :attr:`NeuronPCA.learnables_reduction_range`
run only when something asks for them. Under an initialised ``torch.distributed`` process group,
each rank calibrates on its shard and the moments are summed over the group
(:mod:`rankwise.distributed`), so every rank ends with the statistics of the whole data.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from rankwise.batches import as_batches, model_device, run_batches
from rankwise.blockwise import calibrate_blockwise, check_blockwise
from rankwise.checks import check_max_batches, check_regularization, check_verbosity
from rankwise.distributed import (active_group, all_gather_count, all_reduce_count, all_reduce_tensors,
                                  broadcast_from_first, raise_on_every_rank)
from rankwise.kinds import kind_of
from rankwise.learnables import count_learnables
from rankwise.metric import OutputMetric, whitened_statistics
from rankwise.moments import Moments, NonFiniteActivationError, Spectrum
from rankwise.progress import PROGRESS_DELAY_SECONDS
from rankwise.statistics import Statistics, from_plain, moment_tensors, statistics_for, to_plain
from rankwise.statistics.dense import settled, sharing_inputs
from rankwise.statistics.gradients import check_loss_fn, empty_gradient_moments, gradient_moments
from rankwise.targets import select_layers

SIDES = ("input", "output")
FORMAT_VERSION = 4
# 2: gradient statistics of the loss criterion; 3: recurrent layers' reservoir; 4: a Linear layer
# with d_in <= d_out holds its input's outer, its weight and bias, and output None (derived)
"""Version of the :meth:`NeuronPCA.save` file layout; files of every version up to it load."""
READABLE_VERSIONS = tuple(range(1, FORMAT_VERSION + 1))
NO_BATCH = ("data: the iterable yielded no batch. Pass a DataLoader or a list of tensors holding "
            "representative inputs.")
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
        keyword arguments. A single tensor ``data`` is one batch. Padded batches: a dict
        batch's ``attention_mask`` (``(N, T)``, 1 for a token, 0 for padding), or
        :func:`rankwise.token_mask` entered by ``forward_fn``, keeps the padding positions
        out of every statistic (:mod:`rankwise.masks`); recurrent layers take
        ``PackedSequence`` batches (or one sequence per batch) instead.
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
    loss_fn : {"kl", "mse"} or callable, optional
        Also gather, in the same pass with one backward pass per batch, the Fisher information
        of every dense layer's output that ``criterion="loss"`` needs
        (:mod:`rankwise.statistics.gradients`): ``"kl"`` for classifiers (targets sampled from
        the network's own softmax), ``"mse"`` for embeddings and regression outputs, or a
        callable ``loss_fn(outputs, batch) -> scalar`` (e.g. a loss against the batch's labels).
        ``None`` (the default): no gradients, no backward pass.
    process_group : torch.distributed.ProcessGroup, optional
        Under an initialised ``torch.distributed``, the group whose ranks' moments are summed
        (the default group when ``None``); every rank then holds the same statistics. Give each
        rank its own shard of the data (e.g. with a ``DistributedSampler``).
    blocks : "auto", str or list of str, optional
        Calibrate block by block (:mod:`rankwise.blockwise`), for a model that does not fit on
        ``device`` beside its statistics: the model stays where it is, and each block runs on
        ``device`` in turn with the statistics of its layers; the moments are those of the whole
        model. The block boundary: ``"auto"`` takes the decoder/encoder layers (the largest
        ``nn.ModuleList`` of modules of one class: ``encoder.layer.*`` of a BERT, ``layers.*`` of
        a Llama); or pass names or a pattern of :mod:`rankwise.targets` (``"encoder.layer.*"``)
        of modules called once per forward, in order. Not with ``loss_fn``.
    device : torch.device or str, optional
        With ``blocks``: where each block runs (``"cuda"``); the block's own device when ``None``.

    Attributes
    ----------
    layer_names : list of str
        Layers analysed, in model order.
    num_batches : int
        Batches seen.
    """

    def __init__(self, model: nn.Module, data, layer_names=None, verbosity: str = "summary",
                 forward_fn=None, max_batches: int | None = None, regularization="auto",
                 exclude=None, loss_fn=None, process_group=None, blocks=None, device=None):
        check_verbosity(verbosity)
        check_blockwise(blocks, device, loss_fn)
        check_regularization(regularization)
        check_max_batches(max_batches)
        if loss_fn is not None:
            check_loss_fn(loss_fn)
        layers = select_layers(model, layer_names, exclude)
        self._init_state({name: statistics_for(m) for name, m in layers.items()},
                         count_learnables(model), regularization)
        start = time.perf_counter()
        self._calibrate_shard(model, data, layers, forward_fn, max_batches, verbosity != "off", loss_fn,
                              process_group, blocks, device)
        self._sum_over(process_group)
        seconds = time.perf_counter() - start
        self._check_observations()
        if verbosity != "off":
            print(f"NeuronPCA: {len(self.layer_names)} layers, {self.num_batches} batches, "
                  f"{seconds:.1f} s calibration{self._range_note(verbosity)}")

    def _init_state(self, stats: dict, network_learnables: int, regularization, num_batches=0,
                    gradients=None, gradient_samples=0):
        self._stats = stats
        self.network_learnables = network_learnables
        self._regularization = regularization
        self.num_batches = num_batches
        self._gradients = gradients or {}
        self._gradient_samples = gradient_samples
        self._spectra = {}

    def _calibrate(self, model, data, layers, forward_fn, max_batches, show_progress, loss_fn, blocks,
                   device) -> None:
        """One pass over ``data``: the activation hooks (layers reading the same input tensor
        share its batch moments, forgotten as each batch starts), and with ``loss_fn`` the
        gradients; with ``blocks``, one block at a time (:mod:`rankwise.blockwise`)."""
        with sharing_inputs() as shared:
            handles = [layer.register_forward_hook(self._stats[name].hook(name, layer), with_kwargs=True)
                       for name, layer in layers.items()]
            handles.append(model.register_forward_pre_hook(lambda *_: shared.clear()))
            self._run(model, data, layers, forward_fn, max_batches, show_progress, loss_fn, handles,
                      blocks, device)

    def _run(self, model, data, layers, forward_fn, max_batches, show_progress, loss_fn, handles,
             blocks, device) -> None:
        """Run the batches with ``handles`` registered (the runners remove them)."""
        progress = "NeuronPCA" if show_progress else None
        if blocks is not None:
            self.num_batches = calibrate_blockwise(model, data, self._stats, handles, blocks, device, forward_fn,
                                                   max_batches, progress, NO_BATCH)
            return
        if loss_fn is None:
            self.num_batches = run_batches(model, data, handles, forward_fn, max_batches, progress=progress,
                                           empty_message=NO_BATCH)
            return
        self._gradients, self._gradient_samples, self.num_batches = gradient_moments(
            model, data, _gradient_layers(layers), loss_fn, forward_fn, max_batches, progress, handles=handles)

    def _calibrate_shard(self, model, data, layers, forward_fn, max_batches, show_progress, loss_fn,
                         process_group, blocks, device) -> None:
        """:meth:`_calibrate` on this rank's shard. Under a group of several ranks, a shard that
        yields no batch adds nothing (legal as long as the group saw some), and a rank that fails
        makes every rank raise (:func:`~rankwise.distributed.raise_on_every_rank`) instead of
        leaving the others waiting in the sums."""
        if active_group(process_group) is None:
            self._calibrate(model, data, layers, forward_fn, max_batches, show_progress, loss_fn, blocks, device)
            return
        shard = _Counted(as_batches(data))
        failure = None
        try:
            self._calibrate(model, shard, layers, forward_fn, max_batches, show_progress, loss_fn, blocks, device)
        except Exception as error:  # every rank must hear of it, whatever it is
            if shard.yielded or not isinstance(error, ValueError):
                failure = error
            elif loss_fn is not None:  # an empty shard: zero gradient moments, shaped as the others'
                self._gradients = empty_gradient_moments(_gradient_layers(layers), model_device(model))
        raise_on_every_rank(failure, process_group)

    def _sum_over(self, process_group) -> None:
        """Sum the moments over ``process_group`` (nothing outside an initialised group); the
        recurrent layers' reservoirs of calibration sequences are those of the group's first rank
        that saw a batch."""
        tensors = [t for stats in self._stats.values() for t in moment_tensors(stats)]
        tensors += [t for moments in self._gradients.values() for t in moments.tensors()]
        all_reduce_tensors(tensors, process_group)
        batches = all_gather_count(self.num_batches, process_group)
        self.num_batches = sum(batches)
        if self.num_batches == 0:
            raise ValueError(NO_BATCH)
        sampled = [stats for stats in self._stats.values() if getattr(stats, "reservoir", None) is not None]
        if sampled:
            first = next(rank for rank, count in enumerate(batches) if count)
            reservoirs = broadcast_from_first([stats.reservoir for stats in sampled], process_group, first)
            for stats, reservoir in zip(sampled, reservoirs):
                stats.reservoir = reservoir
        self._gradient_samples = all_reduce_count(self._gradient_samples, process_group)

    @property
    def has_gradients(self) -> bool:
        """Whether the gradient statistics of ``criterion="loss"`` were gathered (``loss_fn``)."""
        return bool(self._gradients)

    def fisher(self, name: str) -> torch.Tensor:
        """``G = sum_t g_t g_t^T / samples``: the Fisher information of layer ``name``'s output
        rows per sample (float64, ``out x out``), from the gradients gathered with ``loss_fn``."""
        if name not in self._gradients:
            raise ValueError(f"criterion: layer {name!r} has no gradient statistics; compute the "
                             "NeuronPCA with loss_fn='kl' (classifiers), 'mse' (embeddings) or a "
                             "callable loss to use criterion='loss' (only Linear and convolution "
                             "layers have them).")
        return self._gradients[name].outer / max(self._gradient_samples, 1)

    @property
    def gradient_samples(self) -> int:
        """Samples the gradient statistics were gathered on (0 without ``loss_fn``)."""
        return self._gradient_samples

    def whitened(self, metrics: dict[str, OutputMetric], layers: dict) -> "NeuronPCA":
        """These statistics as the whitened layers ``R W`` would have gathered them.

        Parameters
        ----------
        metrics : dict of str to OutputMetric
            The output metric of some analysed layers (:mod:`rankwise.metric`).
        layers : dict of str to torch.nn.Module
            The dense layers, by name.

        Returns
        -------
        NeuronPCA
            A new NeuronPCA sharing everything but the whitened layers' statistics.
        """
        stats = {name: whitened_statistics(self.statistics(name), layers[name], metrics[name])
                 if name in metrics else s for name, s in self._stats.items()}
        result = NeuronPCA.__new__(NeuronPCA)
        result._init_state(stats, self.network_learnables, self._regularization, self.num_batches,
                           self._gradients, self._gradient_samples)
        return result

    @property
    def layer_names(self) -> list[str]:
        return list(self._stats)

    @property
    def regularization(self):
        """The shrinkage setting: ``"auto"`` or a float in ``[0, 1]``."""
        return self._regularization

    def statistics(self, name: str) -> Statistics:
        """Moments and weight Grams of layer ``name`` (derived output moments computed once, here)."""
        if name not in self._stats:
            raise KeyError(f"{name!r} was not analysed. Analysed layers: {', '.join(self._stats)}.")
        self._stats[name] = settled(self._stats[name])
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
        if set(self._gradients) != set(other._gradients):
            raise ValueError("merge: only one of the two NeuronPCA has gradient statistics (loss_fn); "
                             "compute both with the same loss_fn.")
        gradients = {name: moments + other._gradients[name] for name, moments in self._gradients.items()}
        result = NeuronPCA.__new__(NeuronPCA)
        result._init_state(merged, self.network_learnables, self._regularization,
                           self.num_batches + other.num_batches, gradients,
                           self._gradient_samples + other._gradient_samples)
        return result

    def save(self, path) -> None:
        """Write the statistics to ``path`` (plain tensors; load with :meth:`load`)."""
        layers = {name: to_plain(stats) for name, stats in self._stats.items()}
        gradients = {name: vars(m) for name, m in self._gradients.items()}
        torch.save({"format_version": FORMAT_VERSION, "layers": layers,
                    "network_learnables": self.network_learnables,
                    "regularization": self._regularization, "num_batches": self.num_batches,
                    "gradients": gradients, "gradient_samples": self._gradient_samples}, path)

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
        gradients = {name: Moments(**m) for name, m in state.get("gradients", {}).items()}
        npca._init_state(stats, state["network_learnables"], state["regularization"],
                         state["num_batches"], gradients, state.get("gradient_samples", 0))
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


class _Counted:
    """An iterable of batches that counts those it yielded (``yielded``), so that a rank can
    tell an empty shard from a failed batch."""

    def __init__(self, batches):
        self.batches, self.yielded = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.yielded += 1
            yield batch

    def __len__(self) -> int:
        return len(self.batches)  # a TypeError for an iterable without a length, as len() raises


def _gradient_layers(layers: dict) -> dict:
    """The layers that get gradient statistics with ``loss_fn``: the dense and embedding ones
    (recurrent and attention layers have no loss criterion)."""
    return {name: layer for name, layer in layers.items()
            if kind_of(layer).family not in ("recurrent", "attention")}
