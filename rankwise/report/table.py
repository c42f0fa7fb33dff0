"""The analysis as terminal tables: one row per goal, then one row per layer.

The rows are plain strings, shared with the HTML report (:mod:`rankwise.report.html`).
"""

from __future__ import annotations

import textwrap

from rankwise.tables import format_ranks, format_table

GOALS_LEGEND = ("var>=X: explained_variance_goal=X, each layer keeps at least that fraction of its "
                "output variance; removed>=Y%: learnables_reduction_goal=Y/100, at least that share of "
                "the network's learnables removed; flops-Z%: flops_reduction_goal=Z/100, at least that "
                "share of the FLOPs on the example batch removed")
FORMS_LEGEND = ("in each goal's column, the form it gives the layer: 'dense', kept as it is; "
                "'in 5 out 15', input projected onto its 5 leading principal directions and output "
                "onto 15 (one side alone: 'out 12'); 'in -/3 out 2/1', an LSTM / GRU with a rank per "
                "cell ('-': that side of the cell dense); 'out 4/-/6', an attention with the ranks of "
                "its key, value and output maps ('-': that map dense)")
LEGEND_WIDTH = 100
UNSUPPORTED_SUFFIX = " layers are not supported"  # why_not_projectable's reason for a type no kind covers


def _flops_removed(info) -> str:
    return "-" if info.flops_before is None else f"{info.flops_reduction:.1%}"


def goal_rows(report, spelled_out: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per goal (as the argument, spelled out first if asked), the network's
    learnables after, reduction and explained variance."""
    counted = any(info.flops_before is not None for info in report.goals.values())
    header = ["goal", *(["argument"] if spelled_out else []), "learnables", "removed",
              *(["FLOPs removed"] if counted else []), "explained var.", "reached"]
    rows = [[*([info.goal.label(spelled_out=True)] if spelled_out else []), goal,
             f"{info.learnables_after:,}", f"{info.learnables_reduction:.1%}",
             *([_flops_removed(info)] if counted else []),
             f"{info.explained_variance:.4f}", "yes" if info.goal_reached else "no (maximum removed)"]
            for goal, info in report.goals.items()]
    return header, rows


def layer_rows(report, spelled_out: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per layer, learnables, reductions, the form each goal gives it, notes.

    Layers of no projectable kind (BatchNorm, LayerNorm, ...) are left to
    :func:`unsupported_line`; a layer of a projectable kind that was refused (a grouped
    convolution, a tied layer) keeps its row and its reason.
    """
    header = ["layer", "type", "learnables", "max. reduction", "lossless",
              *(info.goal.label(spelled_out) for info in report.goals.values()), "note"]
    rows = []
    for name, layer in report.layers.items():
        if _unsupported(layer):
            continue
        if layer.analysed:
            reductions = [f"{layer.max_reduction:.1%}", f"{layer.lossless_reduction:.1%}"]
            forms = [_form(info.layers[name]) for info in report.goals.values()]
        else:
            reductions, forms = ["-", "-"], ["-"] * len(report.goals)
        note = "" if layer.reason is None else (
            f"{'not analysed' if layer.projectable else 'not projectable'}: {layer.reason}")
        rows.append([name, layer.type, f"{layer.learnables:,}", *reductions, *forms, note])
    return header, rows


def unsupported_line(report) -> str | None:
    """``"not of a projectable kind, kept as they are: 20 BatchNorm2d (9,600 learnables)"``, or
    ``None`` when every listed layer is of a projectable kind."""
    counts, learnables = {}, {}
    for layer in report.layers.values():
        if _unsupported(layer):
            counts[layer.type] = counts.get(layer.type, 0) + 1
            learnables[layer.type] = learnables.get(layer.type, 0) + layer.learnables
    if not counts:
        return None
    groups = ", ".join(f"{count} {kind} ({learnables[kind]:,} learnables)" for kind, count in counts.items())
    return f"not of a projectable kind, kept as they are: {groups}"


def summary_line(report) -> str:
    """One sentence on the whole network."""
    lossless, maximum = report.learnables_reduction_range
    return (f"network: {report.network_learnables:,} learnables, {len(report.analysed_layers)} layers "
            f"analysed; projection removes {lossless:.1%} without losing variance, at most "
            f"{maximum:.1%}")


def report_table(report) -> str:
    """The goals table, the layers table, the layers of no projectable kind in one line, a
    summary line, and the legend of the goal columns."""
    parts = [] if not report.goals else [format_table(*goal_rows(report)), ""]
    parts.append(format_table(*layer_rows(report), footer=summary_line(report)))
    parts += [line for line in [unsupported_line(report)] if line]
    if report.goals:
        parts += [textwrap.fill(legend, LEGEND_WIDTH) for legend in (GOALS_LEGEND, FORMS_LEGEND)]
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


def _unsupported(layer) -> bool:
    """Whether ``layer`` is of a type no projectable kind covers (not merely refused)."""
    return not layer.projectable and (layer.reason or "").startswith(f"{layer.type}{UNSUPPORTED_SUFFIX}")


def _projected(ranks) -> bool:
    """Whether a side is projected: a rank, or a rank in at least one cell."""
    return any(r is not None for r in ranks) if isinstance(ranks, tuple) else ranks is not None
