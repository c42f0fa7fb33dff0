"""The analysis as terminal tables: one row per goal, then one row per layer.

The rows are plain strings, shared with the HTML report (:mod:`rankwise.report.html`).
"""

from __future__ import annotations

from rankwise.tables import format_ranks, format_table

GOAL_ABBREVIATIONS = {"explained_variance_goal": "ev", "learnables_reduction_goal": "lr"}


def split_goal(goal: str) -> tuple[str, float]:
    """``"explained_variance_goal=0.95"`` -> ``("explained_variance_goal", 0.95)``."""
    name, _, value = goal.partition("=")
    return name, float(value)


def goal_label(goal: str) -> str:
    """``"explained_variance_goal=0.95"`` -> ``"ev=0.95"``."""
    name, _, value = goal.partition("=")
    return f"{GOAL_ABBREVIATIONS.get(name, name)}={value}"


def goal_rows(report) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per goal, the network's learnables after, reduction and explained variance."""
    header = ["goal", "learnables", "removed", "explained var.", "reached"]
    rows = [[goal, f"{info.learnables_after:,}", f"{info.learnables_reduction:.1%}",
             f"{info.explained_variance:.4f}", "yes" if info.goal_reached else "no (maximum removed)"]
            for goal, info in report.goals.items()]
    return header, rows


def layer_rows(report) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per layer, learnables, reductions, the form each goal gives it, notes."""
    header = ["layer", "type", "learnables", "max. reduction", "lossless", *map(goal_label, report.goals),
              "note"]
    rows = []
    for name, layer in report.layers.items():
        if layer.analysed:
            reductions = [f"{layer.max_reduction:.1%}", f"{layer.lossless_reduction:.1%}"]
            forms = [_form(info.layers[name]) for info in report.goals.values()]
        else:
            reductions, forms = ["-", "-"], ["-"] * len(report.goals)
        note = "" if layer.reason is None else (
            f"{'not analysed' if layer.projectable else 'not projectable'}: {layer.reason}")
        rows.append([name, layer.type, f"{layer.learnables:,}", *reductions, *forms, note])
    return header, rows


def summary_line(report) -> str:
    """One sentence on the whole network."""
    lossless, maximum = report.learnables_reduction_range
    return (f"network: {report.network_learnables:,} learnables, {len(report.analysed_layers)} layers "
            f"analysed; projection removes {lossless:.1%} without losing variance, at most "
            f"{maximum:.1%}")


def report_table(report) -> str:
    """The goals table, the layers table and a summary line; ``ev``/``lr`` name the goals."""
    parts = [] if not report.goals else [format_table(*goal_rows(report)), ""]
    legend = "(ev = explained_variance_goal, lr = learnables_reduction_goal: side and ranks per goal)"
    parts.append(format_table(*layer_rows(report), footer=summary_line(report)))
    if report.goals:
        parts.append(legend)
    if report.sensitivity is not None:
        parts += ["", "sensitivity: the metric (layer learnables) with one layer projected alone",
                  report.sensitivity.table()]
    return "\n".join(parts)


def _form(projection) -> str:
    """``"dense"``, ``"out 12"``, ``"in 3"`` or ``"in 3 out 5"``; a layer of several cells (LSTM,
    GRU) has a rank per cell, ``"in -/-/3/3 out 2/3/1/1"`` (``-``: that cell's side is dense)."""
    if projection.side == "dense":
        return "dense"
    sides = (("in", projection.rank_in), ("out", projection.rank_out))
    return " ".join(f"{label} {format_ranks(ranks)}" for label, ranks in sides if _projected(ranks))


def _projected(ranks) -> bool:
    """Whether a side is projected: a rank, or a rank in at least one cell."""
    return any(r is not None for r in ranks) if isinstance(ranks, tuple) else ranks is not None
