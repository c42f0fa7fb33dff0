"""WidthEvolver: shrink and grow a network's layer widths during training, from their spectra.

A width whose spectrum (the singular values of its producers' effective weights,
:mod:`rankwise.evolve.spectrum`) has values below ``shrink_tol`` times the largest is wider
than it needs: :meth:`WidthEvolver.shrink` keeps its dominant channels and refits the layers
it feeds (:mod:`rankwise.evolve.shrink`). A width whose smallest singular value is still at
least ``grow_tol`` times the largest uses all its room: :meth:`WidthEvolver.grow` adds
channels orthogonal to the existing ones, with zero outgoing weights, so the network's
function does not change (:mod:`rankwise.evolve.grow`). Which widths may change, and which
are tied together by residual additions, comes from the traced graph
(:mod:`rankwise.evolve.graph`). The model is changed in place, so a training loop keeps its
reference to it; the parameters that change are replaced by new ones, and every attached
optimizer gets them, with its state re-indexed (:mod:`rankwise.evolve.optimizer`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rankwise.evolve.activations import consumer_moments
from rankwise.evolve.graph import analyze_widths, trace
from rankwise.evolve.grow import plan_grow
from rankwise.evolve.history import EvolutionEvent, EvolutionHistory
from rankwise.evolve.optimizer import holds_any, sync_optimizer
from rankwise.evolve.shrink import plan_shrink
from rankwise.evolve.spectrum import is_saturated, kept_count, spectrum
from rankwise.forms import shape_spec
from rankwise.learnables import count_learnables
from rankwise.batches import move_to
from rankwise.tables import format_table

VERBOSITY_LEVELS = ("off", "summary", "steps")


class WidthEvolver:
    """Evolve the widths of ``model`` in place from the singular values of its weights.

    Parameters
    ----------
    model : torch.nn.Module
        Changed in place (also available as ``.model``); ``torch.fx.symbolic_trace`` must be
        able to trace it.
    example_input : torch.Tensor or tuple of torch.Tensor
        One input of the model (a batch of one is enough), to know the tensor shapes.
    shrink_tol : float, default 0.05
        :meth:`shrink` removes the directions whose singular value ``s_i`` is below
        ``shrink_tol * s_1``. With 0 nothing is removed.
    grow_tol : float, default 0.5
        A width is *saturated* when its smallest singular value is at least
        ``grow_tol * s_1``; must be larger than ``shrink_tol``, so that a width just shrunk
        is not saturated.
    min_width : int, default 1
        No width is shrunk below this.
    max_width : int, optional
        No width is grown beyond this (no limit by default; a width wider than its producers'
        inputs has zero singular values and is never saturated).
    grow_fraction : float, default 0.25
        The step :meth:`grow` picks: ``ceil(grow_fraction * width)`` channels.
    every : int, default 100
        :meth:`step` shrinks and grows every ``every`` calls.
    until : int, optional
        :meth:`step` changes nothing after this many calls (let the last widths converge).
    seed : int, default 0
        Seed of the random new directions of :meth:`grow`.
    verbosity : {"off", "summary", "steps"}, default "summary"
        ``"summary"`` prints the width table (tied and frozen widths with the reasons) once;
        ``"steps"`` also prints every change.

    Attributes
    ----------
    model : torch.nn.Module
    history : EvolutionHistory
        Every change, and the metrics given to :meth:`log`.
    steps : int
        Calls of :meth:`step` so far.

    Examples
    --------
    >>> evolver = rw.WidthEvolver(model, images[:1], shrink_tol=0.05, every=200)
    >>> optimizer = torch.optim.Adam(model.parameters())
    >>> evolver.attach(optimizer)
    >>> for images, labels in batches:
    ...     loss = cross_entropy(model(images), labels)
    ...     optimizer.zero_grad(); loss.backward(); optimizer.step()
    ...     evolver.step(data=[images])          # recent activations for the refits
    """

    def __init__(self, model: nn.Module, example_input, *, shrink_tol: float = 0.05,
                 grow_tol: float = 0.5, min_width: int = 1, max_width: int | None = None,
                 grow_fraction: float = 0.25, every: int = 100, until: int | None = None,
                 seed: int = 0, verbosity: str = "summary"):
        _check_settings(shrink_tol, grow_tol, min_width, max_width, grow_fraction, every, until, verbosity)
        self.model = model
        self.shrink_tol, self.grow_tol = shrink_tol, grow_tol
        self.min_width, self.max_width = min_width, max_width
        self.grow_fraction, self.every, self.until = grow_fraction, every, until
        self.verbosity = verbosity
        self.steps = 0
        self.history = EvolutionHistory()
        self._example_input = _checked_example_input(example_input)
        self._graph = trace(model)
        self._generator = torch.Generator().manual_seed(seed)
        self._optimizers: list = []
        self._groups = None
        self._initial_shapes = shape_spec(model)
        self._record("start", {})
        if verbosity != "off":
            print(self.summary())

    # -- what may change -------------------------------------------------------------------

    @property
    def groups(self) -> dict:
        """``{name: WidthGroup}`` of every width, frozen ones included, in graph order."""
        if self._groups is None:
            device = next(self.model.parameters()).device
            groups = analyze_widths(self.model, move_to(self._example_input, device), self._graph)
            self._groups = {group.name: group for group in groups}
        return self._groups

    @property
    def frozen(self) -> dict:
        """``{name: reasons}`` of the widths left alone."""
        return {name: group.frozen for name, group in self.groups.items() if group.frozen}

    def widths(self) -> dict:
        """``{name: channels}`` of every width that may change (tied widths under one name)."""
        return {name: group.width for name, group in self.groups.items() if not group.frozen}

    def shape_spec(self) -> dict:
        """The layers whose sizes changed since this evolver started, with their new sizes.

        ``{"conv1": {"type": "Conv2d", "in_channels": 3, "out_channels": 12}, "bn1": {"type":
        "BatchNorm2d", "num_features": 12}}`` (see :func:`rankwise.forms.shape_spec`, which
        :func:`rankwise.save` records for every resizable layer, so that ``rw.load(path,
        model=original)`` rebuilds the evolved widths without the evolver).
        """
        return {name: sizes for name, sizes in shape_spec(self.model).items()
                if sizes != self._initial_shapes.get(name)}

    def spectrum(self, name: str) -> torch.Tensor:
        """Singular values of width ``name`` (see :mod:`rankwise.evolve.spectrum`), descending."""
        return spectrum(self.model, self._group(name, "name"))

    # -- changes ---------------------------------------------------------------------------

    def shrink(self, data=None, forward_fn=None) -> dict:
        """Remove the directions of every width whose singular values are below ``shrink_tol * s_1``.

        Each width keeps ``max(min_width, #{i : s_i >= shrink_tol s_1})`` channels: its top
        singular subspace when only rotation-commuting operations lie between its producers
        and consumers, otherwise the channels that best span it (subset selection). With
        ``data``, the consumers are refitted by least squares on the activations of ``data``;
        without, the removed columns are dropped. What is exact and what is a least-squares
        approximation is written out in :mod:`rankwise.evolve.shrink`.

        Parameters
        ----------
        data : iterable, optional
            A few recent batches (a tensor is the input, a tuple or list starts with it, a dict
            is keyword arguments); run once in eval mode without gradients.
        forward_fn : callable, optional
            ``forward_fn(model, batch)`` for batches of another form.

        Returns
        -------
        dict
            ``{name: (before, after)}`` of the widths that shrank.
        """
        targets = [name for name in self.widths() if self._kept(name) < self.groups[name].width]
        if not targets:
            return {}
        moments = (None if data is None else
                   consumer_moments(self.model, [self.groups[n] for n in targets], data, forward_fn))
        changed = {}
        for name in targets:
            group, kept = self.groups[name], self._kept(name)
            if kept < group.width:
                own = None if moments is None else {i: moments[name, i] for i in range(len(group.consumers))}
                self._apply(plan_shrink(self.model, group, kept, own))
                changed[name] = (group.width, kept)
        self._record("shrink", changed)
        return changed

    def grow(self, layer: str | None = None, n: int | None = None) -> dict:
        """Add channels orthogonal to the existing ones, with zero outgoing weights.

        The network's function is exactly unchanged (:mod:`rankwise.evolve.grow`).

        Parameters
        ----------
        layer : str, optional
            The width to grow (a key of :meth:`widths`). By default every saturated width
            (smallest singular value at least ``grow_tol`` times the largest).
        n : int, optional
            Channels to add; by default ``ceil(grow_fraction * width)``, capped at ``max_width``.

        Returns
        -------
        dict
            ``{name: (before, after)}`` of the widths that grew.
        """
        if layer is not None:
            self._group(layer, "layer")
        _check_count(n)
        if layer is not None and n is not None and self.max_width is not None \
                and self.groups[layer].width + n > self.max_width:
            raise ValueError(f"n: {layer} has {self.groups[layer].width} channels and max_width is "
                             f"{self.max_width}; pass n <= {self.max_width - self.groups[layer].width}.")
        names = [layer] if layer is not None else [name for name in self.widths() if self._saturated(name)]
        return self._grow(names, n)

    def step(self, data=None, forward_fn=None) -> dict:
        """Count one training step; every ``every`` steps (until ``until``) shrink, then grow.

        Widths that shrank at this step are not grown at it.

        Parameters
        ----------
        data, forward_fn
            Passed to :meth:`shrink`: recent batches for the least-squares refits.

        Returns
        -------
        dict
            ``{name: (before, after)}`` of the widths that changed (empty on most steps).
        """
        self.steps += 1
        if self.steps % self.every or (self.until is not None and self.steps > self.until):
            return {}
        shrunk = self.shrink(data, forward_fn)
        grown = self._grow([n for n in self.widths() if n not in shrunk and self._saturated(n)], None)
        return {**shrunk, **grown}

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Keep ``optimizer`` consistent after every change (returns it).

        Changed parameters are replaced by new ones in its parameter groups, and state
        tensors shaped like them are re-indexed with them: kept entries keep their state, new
        entries start from zero (:mod:`rankwise.evolve.optimizer`). Anything else holding the
        model's parameters (another optimizer, an EMA copy) must be attached too or rebuilt.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        if not holds_any(optimizer, self.model.parameters()):
            raise ValueError("optimizer: it holds none of the model's parameters; build it from "
                             "evolver.model.parameters() and attach it.")
        self._optimizers.append(optimizer)
        return optimizer

    def log(self, **metrics) -> None:
        """Record metrics (e.g. ``accuracy=0.98``) at the current step, for the plots."""
        self.history.log(self.steps, **metrics)

    # -- reporting -------------------------------------------------------------------------

    def summary(self) -> str:
        """A table of every width: channels, producers, consumers, and whether it may change."""
        rows = [(name, str(g.width), ", ".join(g.producers), str(len(g.consumers)), _status(g))
                for name, g in self.groups.items()]
        return format_table(("width", "channels", "producers", "consumers", "status"), rows,
                            f"{count_learnables(self.model):,} learnables; "
                            f"{len(self.widths())} of {len(rows)} widths may change")

    def __repr__(self) -> str:
        return f"WidthEvolver(widths={self.widths()}, steps={self.steps})"

    # -- internals -------------------------------------------------------------------------

    def _group(self, name, argument: str):
        if not isinstance(name, str) or name not in self.groups:
            raise ValueError(f"{argument}: no width named {name!r}; choose one of {list(self.widths())}.")
        if self.groups[name].frozen:
            raise ValueError(f"{argument}: width {name!r} is frozen ({'; '.join(self.groups[name].frozen)}); "
                             f"choose one of {list(self.widths())}.")
        return self.groups[name]

    def _kept(self, name: str) -> int:
        group = self.groups[name]
        kept = max(self.min_width, kept_count(spectrum(self.model, group), self.shrink_tol))
        return min(kept, group.width)

    def _saturated(self, name: str) -> bool:
        return is_saturated(spectrum(self.model, self.groups[name]), self.grow_tol)

    def _grow(self, names: list, n: int | None) -> dict:
        changed = {}
        for name in names:
            group = self.groups[name]
            count = n if n is not None else math.ceil(self.grow_fraction * group.width)
            if self.max_width is not None:
                count = min(count, self.max_width - group.width)
            if count > 0:
                self._apply(plan_grow(self.model, group, count, self._generator))
                changed[name] = (group.width, group.width + count)
        self._record("grow", changed)
        return changed

    def _apply(self, plan) -> None:
        replaced = plan.apply()
        self._groups = None
        for optimizer in self._optimizers:
            sync_optimizer(optimizer, replaced)

    def _record(self, kind: str, changed: dict) -> None:
        if kind != "start" and not changed:
            return
        self.history.events.append(EvolutionEvent(self.steps, kind, self.widths(), dict(changed),
                                                  count_learnables(self.model)))
        if self.verbosity == "steps" and changed:
            print(f"step {self.steps}: {kind} " + ", ".join(f"{n} {a}->{b}" for n, (a, b) in changed.items())
                  + f"; {count_learnables(self.model):,} learnables")


def _status(group) -> str:
    if group.frozen:
        return "frozen: " + "; ".join(group.frozen)
    tied = f"tied by additions ({len(group.producers)} producers)" if group.tied else "may change"
    return tied + ("" if group.rotatable else ", channel selection")


def _checked_example_input(example_input):
    tensors = example_input if isinstance(example_input, tuple) else (example_input,)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError("example_input: expected a tensor or a tuple of tensors the model accepts "
                         "(one training batch, or its first sample with the batch dimension).")
    return tuple(t.detach() for t in tensors) if isinstance(example_input, tuple) else example_input.detach()


def _check_count(n) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n: expected a positive integer (channels to add) or None, got {n!r}.")


def _check_settings(shrink_tol, grow_tol, min_width, max_width, grow_fraction, every, until, verbosity):
    for name, value in (("shrink_tol", shrink_tol), ("grow_tol", grow_tol)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ValueError(f"{name}: expected a number in [0, 1] (relative to the largest singular "
                             f"value), got {value!r}.")
    if grow_tol <= shrink_tol:
        raise ValueError(f"grow_tol: must be larger than shrink_tol ({shrink_tol}), or a width just "
                         f"shrunk would count as saturated; got {grow_tol}.")
    for name, value in (("min_width", min_width), ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}.")
    if max_width is not None and (isinstance(max_width, bool) or not isinstance(max_width, int)
                                  or max_width < min_width):
        raise ValueError(f"max_width: expected None or an integer >= min_width ({min_width}), got {max_width!r}.")
    if until is not None and (isinstance(until, bool) or not isinstance(until, int) or until < 0):
        raise ValueError(f"until: expected None or a non-negative integer, got {until!r}.")
    if not isinstance(grow_fraction, int | float) or not grow_fraction > 0:
        raise ValueError(f"grow_fraction: expected a positive number, got {grow_fraction!r}.")
    if verbosity not in VERBOSITY_LEVELS:
        raise ValueError(f"verbosity: expected one of {VERBOSITY_LEVELS}, got {verbosity!r}.")
