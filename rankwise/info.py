"""What a projection did: :class:`ProjectionInfo`, one :class:`LayerProjection` per layer.

The records are built from explicit decisions (:func:`describe_choice`) by
:func:`rankwise.projection.build_projected`, for a compressed model and for a dry run alike, and
saved with the model by :func:`rankwise.save` (fields added later have defaults, so older
files load).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from rankwise import latency
from rankwise.goals import Goal
from rankwise.kinds import kind_of
from rankwise.learnables import count_learnables
from rankwise.ranks import RankChoice
from rankwise.tables import format_ranks, format_table


@dataclass(frozen=True)
class LayerProjection:
    """What happened to one analysed layer.

    ``side`` is ``"dense"`` for a layer left as it was; ``rank_in`` / ``rank_out`` are the
    widths of its input / output projections (``None`` where that side is not projected);
    ``explained_variance`` is the estimated fraction of the layer's output variance kept.
    ``dense_seconds`` / ``projected_seconds`` are the median latencies of the layer and of its
    projected form measured on ``latency_input`` (``None`` when not measured); for a layer kept
    dense because its projected form was not faster, those of the form that was rejected. For an
    LSTM or GRU layer the sides are its input and its hidden state, the output variance that of
    its gate pre-activations, and the ranks, for a layer of several cells (stacked layers,
    directions), tuples over the cells ``l0, l0_reverse, l1, ...`` (see :mod:`rankwise.ranks`).

    ``explained_variance`` is an estimate from the calibration statistics, never a measurement:
    exact on them for an output projection but for the thin-data shrinkage, an estimate
    (positions treated as independent) for a convolution's input side, and for both sides a
    lower bound (the two errors are added). ``space`` says where it is measured: ``"output"``
    (the layer's own output), ``"batchnorm"`` (after the BatchNorm that follows the layer) or
    ``"fisher"`` (weighted by the Fisher information of the loss, ``criterion="loss"``), and
    ``error`` is the criterion's estimate (with ``"loss"``, the estimated increase of the loss).

    ``measured_explained_variance`` is, for an LSTM or GRU layer, a measurement: the explained
    variance of its output sequence, ``1 - E|h - h'|^2 / E|h - mean h|^2`` over the time steps of
    the calibration sequences kept by the NeuronPCA, the original and the projected layer run
    through the whole recurrence (:mod:`rankwise.ranks.sequence`); ``None`` where not measured
    (other kinds, or a NeuronPCA without calibration sequences).
    """

    name: str
    kind: str
    side: str
    rank_in: int | tuple | None
    rank_out: int | tuple | None
    learnables_before: int
    learnables_after: int
    explained_variance: float
    dense_seconds: float | None = None
    projected_seconds: float | None = None
    space: str = "output"
    error: float = 0.0
    measured_explained_variance: float | None = None


@dataclass(frozen=True)
class ProjectionInfo:
    """Outcome of :func:`compress_network_using_projection`.

    Attributes
    ----------
    goal : Goal
        The goal as given (``str(info.goal)``: ``"learnables_reduction_goal=0.9"``).
    goal_reached : bool
        False when a learnables reduction goal was above the maximum possible (the maximum
        was removed).
    learnables_before, learnables_after : int
        Learnables of the whole network.
    layers : dict of str to LayerProjection
        Every analysed layer, projected or kept dense, in model order.
    kept_dense_for_latency : list of str
        Layers kept dense because their projected form was not faster on ``latency_input``
        (empty when no ``latency_input`` was given).
    latency_device : str or None
        The device latencies were measured on (``None`` when no ``latency_input`` was given).
    excluded : list of str
        Layers that ``layer_names`` selected and ``exclude`` left out, the layers left out
        because their weight is tied to another module's (a language model's output head and
        token embedding; the reason is in ``warnings``), and by default the Linear layers whose
        parent uses their weight functionally (the ``out_proj`` of an ``nn.MultiheadAttention``
        that is not projected; :func:`rankwise.targets.functional_layers` says why), in model
        order (empty when nothing was excluded).
    warnings : list of str
        What the user should know about the outcome (a goal that could not be reached: the
        maximum that could); each was also issued as a ``UserWarning``.
    measured : MeasuredChoice or None
        How the criterion, allocation and shrinkage were chosen (:mod:`rankwise.selection`):
        the candidate kept, every candidate's score on the held-out batches, the reason.
    flops_before, flops_after : int or None
        Under a ``flops_reduction_goal``: the network's FLOPs on the example batch
        (``flops_input``) before and after (``None`` under the other goals).
    latency_before, latency_after : float or None
        Under a ``latency_reduction_goal``: the original's and the compressed network's median
        seconds on ``latency_input``, measured by :func:`rankwise.compare_speed` (``None`` under
        the other goals).
    """

    goal: Goal
    goal_reached: bool
    learnables_before: int
    learnables_after: int
    layers: dict
    kept_dense_for_latency: list = field(default_factory=list)
    latency_device: str | None = None
    excluded: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    measured: object = None
    flops_before: int | None = None
    flops_after: int | None = None
    latency_before: float | None = None
    latency_after: float | None = None

    @property
    def flops_reduction(self) -> float | None:
        """Fraction of the network's FLOPs on the example batch removed (``None`` when not counted)."""
        return None if self.flops_before is None else 1.0 - self.flops_after / self.flops_before

    @property
    def latency_reduction(self) -> float | None:
        """Fraction of the network's measured latency on ``latency_input`` removed (``None`` when
        not measured for a latency goal)."""
        return None if self.latency_before is None else 1.0 - self.latency_after / self.latency_before

    @property
    def candidates(self) -> list:
        """Every candidate measured on the held-out batches, with its score
        (:class:`~rankwise.selection.CandidateScore`, lower is better); empty when none was."""
        return [] if self.measured is None else list(self.measured.scores)

    @property
    def choice(self) -> str:
        """The criterion, allocation and shrinkage the decisions used, and why."""
        if self.measured is None:
            return ""
        return self.measured.chosen.label + (f" ({self.measured.reason})" if self.measured.reason else "")

    @property
    def learnables_reduction(self) -> float:
        """Fraction of the whole network's learnables removed."""
        return 1.0 - self.learnables_after / self.learnables_before

    @property
    def explained_variance(self) -> float:
        """Mean explained variance of the analysed layers, weighted by their original learnables."""
        weights = [p.learnables_before for p in self.layers.values()]
        kept = [p.learnables_before * p.explained_variance for p in self.layers.values()]
        return sum(kept) / sum(weights)

    @property
    def layer_names(self) -> list[str]:
        """The layers that were projected (not kept dense)."""
        return [name for name, p in self.layers.items() if p.side != "dense"]

    def table(self) -> str:
        """A before/after table of layers, ranks, learnables and explained variance.

        When latencies were measured (``latency_input``), a column gives each measured layer's
        dense and projected latencies and a last line the layers kept dense for speed; a line
        lists the layers left out by ``exclude``.
        """
        header = ("layer", "type", "side", "rank in", "rank out", "learnables", "explained var. (est.)")
        rows = [(p.name, p.kind, p.side, format_ranks(p.rank_in), format_ranks(p.rank_out),
                 f"{p.learnables_before:,} -> {p.learnables_after:,}",
                 ("≥" if p.side == "both" else "") + f"{p.explained_variance:.4f}" + _SPACE_MARKS[p.space])
                for p in self.layers.values()]
        footer = (f"network: {self.learnables_before:,} -> {self.learnables_after:,} learnables "
                  f"({100 * self.learnables_reduction:.1f}% removed), explained variance "
                  f"{self.explained_variance:.4f}, {self.goal}"
                  + ("" if self.goal_reached else " (not reached as measured)" if self.latency_before is not None
                     else " (not reachable by the layers that get faster)" if self.kept_dense_for_latency
                     else " (not reachable: the maximum was removed)"))
        if self.latency_device is not None:
            header += ("latency dense -> projected",)
            rows = [row + (_format_latency(p, p.name in self.kept_dense_for_latency),)
                    for row, p in zip(rows, self.layers.values())]
            footer += "\n" + (f"kept dense: not faster on {self.latency_device}: "
                              + ", ".join(self.kept_dense_for_latency) if self.kept_dense_for_latency
                              else f"latency on {self.latency_device}: every projected layer is faster")
        if self.flops_before is not None:
            footer += (f"\nFLOPs on the example batch: {self.flops_before:,} -> {self.flops_after:,} "
                       f"({100 * self.flops_reduction:.1f}% removed)")
        if self.latency_before is not None:
            footer += (f"\nlatency on latency_input (measured): {latency.format_seconds(self.latency_before)} -> "
                       f"{latency.format_seconds(self.latency_after)} ({100 * self.latency_reduction:.1f}% removed)")
        footer += self._notes()
        if self.excluded:
            footer += "\nexcluded: " + ", ".join(self.excluded)
        return format_table(header, rows, footer=footer)

    def _notes(self) -> str:
        """The legend of the explained-variance column and the warnings, one line each."""
        spaces = {p.space for p in self.layers.values()} - {"output"}
        notes = ["explained variance: estimated from the calibration statistics"
                 + ("; ≥ marks a lower bound (both sides projected)" if any(
                     p.side == "both" for p in self.layers.values()) else "")]
        notes += [_SPACE_LEGENDS[space] for space in sorted(spaces)]
        notes += [f"{p.name}: output sequence explained variance measured on the calibration "
                  f"sequences: {p.measured_explained_variance:.4f}"
                  for p in self.layers.values() if p.measured_explained_variance is not None]
        if "fisher" in spaces:
            loss = sum(p.error for p in self.layers.values())
            notes.append(f"estimated increase of the loss (second order, summed over layers): {loss:.4g}")
        notes += self._candidate_lines()
        notes += [f"warning: {warning}" for warning in self.warnings]
        return "".join("\n" + note for note in notes)

    def _candidate_lines(self) -> list[str]:
        """One line per measured candidate and the choice, for :meth:`table`."""
        if self.measured is None:
            return []
        lines = [f"candidate {s.candidate.label}: " + (f"{self.measured.score_name} {s.score:.4g}, "
                                                       f"{s.learnables_after:,} learnables"
                                                       if s.score is not None else f"not built: {s.note}")
                 for s in self.measured.scores]
        return lines + [f"chosen: {self.choice}"]

    def __str__(self) -> str:
        return self.table()


_SPACE_MARKS = {"output": "", "batchnorm": " (bn)", "fisher": " (F)"}
_SPACE_LEGENDS = {"batchnorm": "(bn): measured after the BatchNorm that follows the layer",
                  "fisher": "(F): weighted by the Fisher information of the loss (criterion='loss')"}


def describe_choice(name: str, layer: nn.Module, choice: RankChoice,
                    timing: tuple[float, float] | None = None, space: str = "output") -> LayerProjection:
    """What choosing ``choice`` for the dense ``layer`` called ``name`` does to it, with its
    measured ``(dense_seconds, projected_seconds)`` if any and the ``space`` its explained
    variance is measured in."""
    return LayerProjection(name, kind_of(layer).name, choice.side, choice.rank_in, choice.rank_out,
                           count_learnables(layer),
                           count_learnables(layer) if choice.side == "dense" else choice.learnables,
                           choice.explained_variance, *(timing or (None, None)), space, choice.error,
                           choice.measured_explained_variance)


def _format_latency(p: LayerProjection, kept_dense: bool) -> str:
    if p.dense_seconds is None:
        return "-"
    return (f"{latency.format_seconds(p.dense_seconds)} -> {latency.format_seconds(p.projected_seconds)}"
            + (" (slower: kept dense)" if kept_dense else ""))
