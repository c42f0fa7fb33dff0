"""What a width evolver did over training: widths, learnables and the metrics the user logs."""

from __future__ import annotations

from dataclasses import dataclass, field

from rankwise.tables import format_table


@dataclass(frozen=True)
class EvolutionEvent:
    """The network right after one change (or at the start).

    Attributes
    ----------
    step : int
        Training steps counted by :meth:`WidthEvolver.step` when it happened.
    kind : {"start", "shrink", "grow"}
    widths : dict
        ``{width name: channels}`` of every width that may change, after the event.
    changed : dict
        ``{width name: (before, after)}`` of the widths this event changed.
    learnables : int
        Learnables of the whole network after the event.
    """

    step: int
    kind: str
    widths: dict
    changed: dict
    learnables: int


@dataclass
class EvolutionHistory:
    """Every change an evolver made, and metrics logged along the way.

    Attributes
    ----------
    events : list of EvolutionEvent
    metrics : dict
        ``{metric name: [(step, value), ...]}`` from :meth:`WidthEvolver.log`.
    """

    events: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def log(self, step: int, **metrics) -> None:
        """Append ``value`` at ``step`` to each named metric."""
        for name, value in metrics.items():
            self.metrics.setdefault(name, []).append((step, float(value)))

    def table(self) -> str:
        """One line per event: step, kind, learnables and the widths it changed."""
        rows = [(str(e.step), e.kind, f"{e.learnables:,}",
                 ", ".join(f"{n} {a}->{b}" for n, (a, b) in e.changed.items()) or "-")
                for e in self.events]
        return format_table(("step", "event", "learnables", "changed"), rows)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path=None, metric_names=None):
        """Widths, learnables and logged metrics over training (see :func:`plots.plot_history`)."""
        from rankwise.evolve.plots import plot_history

        return plot_history(self, path, metric_names)
