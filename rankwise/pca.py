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

import torch
from torch import nn
from tqdm.auto import tqdm

from rankwise.batches import model_device
from rankwise.blockwise import check_blockwise
from rankwise.checks import check_max_batches, check_regularization, check_verbosity
from rankwise.distributed import active_group
from rankwise.holdout import HeldOutSplit, check_validation
from rankwise.learnables import count_learnables
from rankwise.metric import OutputMetric, whitened_statistics
from rankwise.moments import NonFiniteActivationError, Spectrum
from rankwise.progress import PROGRESS_DELAY_SECONDS
from rankwise.statistics import Statistics, files
from rankwise.statistics.calibration import ThinDataWarning, check_observations, gather, gradient_layers
from rankwise.statistics.dense import settled
from rankwise.statistics.gradients import check_loss_fn, empty_gradient_moments
from rankwise.targets import select_layers

SIDES = ("input", "output")
__all__ = ["NeuronPCA", "NonFiniteActivationError", "ThinDataWarning"]


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
    loss_fn : {"auto", "kl", "mse"}, callable or None
        Also gather, in the same pass with one backward pass per batch, the Fisher information
        of every dense layer's output that ``criterion="loss"`` needs
        (:mod:`rankwise.statistics.gradients`): ``"kl"`` for classifiers (targets sampled from
        the network's own softmax), ``"mse"`` for embeddings and regression outputs, or a
        callable ``loss_fn(outputs, batch) -> scalar`` (e.g. a loss against the batch's labels).
        ``"auto"`` (the default) takes ``"kl"`` where the output is logits and ``"mse"``
        elsewhere (:func:`rankwise.statistics.gradients.output_loss`: a ``.logits`` output, or a
        ``(N, C)`` output of batches with integer labels), on every fourth fitted batch only (the
        Fisher information from a quarter of the samples, for about a quarter of the backward
        passes' cost), and gathers nothing where no built-in loss reads the output, where no
        analysed layer has a loss criterion (LSTM, GRU and attention layers only), with
        ``blocks``, or under a ``torch.distributed`` group.
        ``None``: no gradients, no backward pass (the cheapest calibration: one forward pass).
    validation : "auto", float, iterable or None
        The calibration batches held out to measure the decisions on
        (:mod:`rankwise.holdout`): ``"auto"`` (the default) every fourth batch from the second
        (batch ``i`` with ``i % 4 == 1``), a fraction in ``(0, 0.5]``, separate batches, or
        ``None`` (nothing held out). The statistics of the fitted part are kept beside those of
        every batch (twice the statistics' memory) with the held-out batches themselves, so that
        :func:`~rankwise.compress_network_using_projection` can score its candidates on them.
        Under a ``torch.distributed`` group, ``"auto"`` holds nothing out (pass separate batches).
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
                 exclude=None, loss_fn="auto", process_group=None, blocks=None, device=None,
                 validation="auto"):
        check_verbosity(verbosity)
        check_blockwise(blocks, device, None if loss_fn == "auto" else loss_fn)
        check_regularization(regularization)
        check_max_batches(max_batches)
        check_validation(validation)
        if loss_fn is not None and loss_fn != "auto":
            check_loss_fn(loss_fn)
        layers = select_layers(model, layer_names, exclude)
        if active_group(process_group) is not None:  # the same choices on every rank, without collectives
            validation = None if validation == "auto" else validation
            loss_fn = None if loss_fn == "auto" else loss_fn
        split = None if validation is None else HeldOutSplit(data, validation, max_batches)
        if loss_fn == "auto" and (blocks is not None or not gradient_layers(layers)):
            loss_fn = None
        start = time.perf_counter()
        self._gather(model, data if split is None else split, layers, forward_fn, max_batches if split is None else None,
                     verbosity != "off", loss_fn, process_group, blocks, device, count_learnables(model),
                     regularization)
        self._hold_out(split, model, layers, forward_fn, loss_fn)
        seconds = time.perf_counter() - start
        check_observations(self._stats)
        if verbosity != "off":
            print(f"NeuronPCA: {len(self.layer_names)} layers, {self.num_batches} batches, "
                  f"{seconds:.1f} s calibration{self._range_note(verbosity)}")

    def _hold_out(self, split, model, layers, forward_fn, loss_fn) -> None:
        """Keep the held-out batches of ``split`` with the statistics of the fitted part, and make
        this NeuronPCA's statistics those of every batch (:mod:`rankwise.holdout`)."""
        if split is None or not split.held_out:
            return
        if split.separate:
            self._validation = (split.held_out, None)
            return
        held = NeuronPCA.__new__(NeuronPCA)  # with loss_fn="auto", the fitted part's gradients only
        held._gather(model, split.held_out, layers, forward_fn, None, False, None if loss_fn == "auto" else loss_fn,
                     None, None, None, self.network_learnables, self._regularization)
        fitted = self._view(self._regularization)
        if loss_fn == "auto":
            held._gradients = empty_gradient_moments({name: layer for name, layer in gradient_layers(layers, model).items()
                                                      if name in self._gradients}, model_device(model))
        merged = fitted.merge(held)
        self._init_state(merged._stats, self.network_learnables, self._regularization, merged.num_batches,
                         merged._gradients, merged._gradient_samples)
        self._validation = (split.held_out, fitted)

    def _gather(self, model, data, layers, forward_fn, max_batches, show_progress, loss_fn, process_group,
                blocks, device, network_learnables, regularization) -> None:
        """This NeuronPCA's statistics: one calibration pass over ``data``, summed over the group."""
        gathered = gather(model, data, layers, forward_fn, max_batches, show_progress, loss_fn, process_group,
                          blocks, device)
        self._init_state(gathered.stats, network_learnables, regularization, gathered.num_batches,
                         gathered.gradients, gathered.gradient_samples)

    def _init_state(self, stats: dict, network_learnables: int, regularization, num_batches=0,
                    gradients=None, gradient_samples=0, validation=None):
        self._validation = validation
        self._stats = stats
        self.network_learnables = network_learnables
        self._regularization = regularization
        self.num_batches = num_batches
        self._gradients = gradients or {}
        self._gradient_samples = gradient_samples
        self._spectra = {}

    def _view(self, regularization) -> "NeuronPCA":
        """A NeuronPCA sharing these statistics (not the held-out part) with another shrinkage."""
        view = NeuronPCA.__new__(NeuronPCA)
        view._init_state(self._stats, self.network_learnables, regularization, self.num_batches,
                         self._gradients, self._gradient_samples)
        return view

    def with_regularization(self, regularization) -> "NeuronPCA":
        """These statistics (held-out part included) under another shrinkage ``alpha``
        (``regularization``: ``"auto"`` or a float in ``[0, 1]``; ``1`` is the weights' own
        spectrum, data-free truncated SVD). The moments are shared; only the spectra differ."""
        check_regularization(regularization)
        view = self._view(regularization)
        if self._validation is not None:
            batches, fitted = self._validation
            view._validation = (batches, None if fitted is None else fitted._view(regularization))
        return view

    @property
    def validation_batches(self) -> list:
        """The held-out calibration batches (:mod:`rankwise.holdout`); empty when none were."""
        return [] if self._validation is None else self._validation[0]

    def fitted(self) -> "NeuronPCA":
        """The statistics of the calibration batches that were not held out (these statistics
        when the held-out batches were given apart, or when nothing was held out)."""
        fitted = None if self._validation is None else self._validation[1]
        return self._view(self._regularization) if fitted is None else fitted

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

        Both must cover the same layers with the same shapes. The held-out batches of both are
        kept when both held some out from their own data; otherwise the merged NeuronPCA holds
        none out.
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
                           self._gradient_samples + other._gradient_samples,
                           _merged_validation(self, other))
        return result

    def save(self, path) -> None:
        """Write the statistics to ``path`` (plain tensors; load with :meth:`load`), with the
        held-out batches and the fitted part's statistics (:mod:`rankwise.statistics.files`)."""
        batches, fitted = self._validation or (None, None)
        files.write(path, self._plain(), self.network_learnables, self._regularization, batches,
                    fitted and fitted._plain())

    def _plain(self) -> dict:
        return files.plain_part(self._stats, self._gradients, self.num_batches, self._gradient_samples)

    @classmethod
    def load(cls, path) -> "NeuronPCA":
        """Read statistics written by :meth:`save` (no arbitrary code is unpickled)."""
        state = files.read(path)
        npca = _from_plain(state, state["network_learnables"], state["regularization"])
        if state["validation"] is not None:
            fitted = state["validation"]["fitted"]
            npca._validation = (state["validation"]["batches"],
                                fitted and _from_plain(fitted, npca.network_learnables, npca.regularization))
        return npca

    def __repr__(self) -> str:
        return f"NeuronPCA({len(self._stats)} layers, {self.num_batches} batches)"


def _from_plain(plain: dict, network_learnables: int, regularization) -> NeuronPCA:
    """A NeuronPCA from a :func:`rankwise.statistics.files.plain_part`."""
    stats, gradients, num_batches, gradient_samples = files.part_from_plain(plain)
    npca = NeuronPCA.__new__(NeuronPCA)
    npca._init_state(stats, network_learnables, regularization, num_batches, gradients, gradient_samples)
    return npca


def _merged_validation(first: NeuronPCA, second: NeuronPCA):
    """The held-out part of the union of two NeuronPCA (see :meth:`NeuronPCA.merge`)."""
    if first._validation is None or second._validation is None:
        return None
    return first.validation_batches + second.validation_batches, first.fitted().merge(second.fitted())
