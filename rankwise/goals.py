"""Goals: what a compression is asked to reach, as one value carried from the checks to the report.

A :class:`Goal` is a kind and a value: ``explained_variance`` (each layer keeps at least this
fraction of its output variance), ``learnables_reduction`` (at least this fraction of the
whole network's learnables removed), ``flops_reduction`` (at least this fraction of the
network's FLOPs on an example input removed) or ``latency_reduction`` (at least this fraction of
the network's measured latency on an example input removed). :func:`check_goals` makes it from the exclusive
arguments; the decisions, the infos, the incremental history and the report carry it as it is,
and print it as the argument it came from (``learnables_reduction_goal=0.5``).
"""

from __future__ import annotations

from dataclasses import dataclass

from rankwise.checks import DEFAULT_EXPLAINED_VARIANCE, check_fraction

LABELS = {  # kind -> (column label, spelled out), formatted with the goal's value
    "explained_variance": ("var>={value:g}", "explained variance \u2265 {value:g}"),
    "learnables_reduction": ("removed>={percent:g}%", "learnables removed \u2265 {percent:g}%"),
    "flops_reduction": ("flops-{percent:g}%", "FLOPs removed \u2265 {percent:g}%"),
    "latency_reduction": ("latency-{percent:g}%", "latency removed \u2265 {percent:g}%"),
}
"""Every kind of goal; adding one is an entry here, and its allocation in :mod:`rankwise.ranks`."""


@dataclass(frozen=True)
class Goal:
    """A compression goal.

    Attributes
    ----------
    kind : {"explained_variance", "learnables_reduction", "flops_reduction", "latency_reduction"}
    value : float in [0, 1]
    """

    kind: str
    value: float

    @property
    def argument(self) -> str:
        """The keyword argument that sets it: ``"learnables_reduction_goal"``, ..."""
        return f"{self.kind}_goal"

    @property
    def is_budget(self) -> bool:
        """Whether it is a budget for the whole network, of learnables, FLOPs or latency
        (candidates then compare at equal size; :mod:`rankwise.selection`)."""
        return self.kind in ("learnables_reduction", "flops_reduction", "latency_reduction")

    @property
    def is_cost(self) -> bool:
        """Whether it is a budget of what running the network costs (FLOPs or latency on an
        example input), priced by a cost budget (:mod:`rankwise.ranks.costs`)."""
        return self.kind in ("flops_reduction", "latency_reduction")

    def label(self, spelled_out: bool = False) -> str:
        """``"var>=0.95"`` / ``"removed>=50%"``, spelled out ``"explained variance >= 0.95"`` /
        ``"learnables removed >= 50%"`` (never ``lr``, which reads as a learning rate)."""
        return LABELS[self.kind][spelled_out].format(value=self.value, percent=round(100 * self.value, 6))

    def __str__(self) -> str:
        return f"{self.argument}={self.value:g}"

    @classmethod
    def from_stored(cls, stored) -> "Goal":
        """A goal as :func:`rankwise.save` keeps it (``{"kind", "value"}``), or as files written
        before goals were values kept it (``"learnables_reduction_goal=0.5"``)."""
        if isinstance(stored, dict):
            return cls(**stored)
        argument, _, value = str(stored).partition("=")
        return cls(argument.removesuffix("_goal"), float(value))


def check_goals(explained_variance_goal, learnables_reduction_goal, flops_reduction_goal=None,
                latency_reduction_goal=None) -> Goal:
    """The :class:`Goal` of the exclusive goal arguments (the explained variance goal of
    :data:`~rankwise.checks.DEFAULT_EXPLAINED_VARIANCE` when none is given), or a ValueError."""
    given = {name: value for name, value in (("explained_variance_goal", explained_variance_goal),
                                             ("learnables_reduction_goal", learnables_reduction_goal),
                                             ("flops_reduction_goal", flops_reduction_goal),
                                             ("latency_reduction_goal", latency_reduction_goal)) if value is not None}
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} are exclusive: give one of them.")
    if not given:
        return Goal("explained_variance", DEFAULT_EXPLAINED_VARIANCE)
    (argument, value), = given.items()
    return Goal(argument.removesuffix("_goal"), check_fraction(value, argument))


def check_allocation(allocation, goal: Goal) -> None:
    """``allocation`` must be ``"auto"``, ``"global"`` or ``"uniform"``, and ``"uniform"`` needs a
    learnables, FLOPs or latency goal."""
    if allocation not in ("auto", "global", "uniform"):
        raise ValueError(f"allocation: expected 'auto', 'global' or 'uniform', got {allocation!r}.")
    if allocation == "uniform" and not goal.is_budget:
        raise ValueError("allocation: 'uniform' spreads a learnables, FLOPs or latency reduction goal over "
                         "the layers; "
                         "with an explained_variance_goal every layer already gets its own ranks.")
