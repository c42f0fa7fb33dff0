"""The analysis as one self-contained HTML page: tables and plots, no external resource.

Each plot is a PNG embedded as ``data:image/png;base64``; the page needs no script, no
stylesheet and no network. Several reports (one per model) can share a page.
"""

from __future__ import annotations

import base64
import html

from rankwise.report.plots import learnables_png, spectrum_png, tradeoff_png
from rankwise.report.table import (FORMS_LEGEND, goal_rows, layer_rows, summary_line,
                                   unsupported_line)

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; }
img.plot { display: block; margin: 1em 0; max-width: 100%; }
p.legend { font-size: 0.9em; color: #555; max-width: 60em; }
"""
HOW_TO_READ = {  # section -> how to read it
    "introduction": "Projection replaces a layer by its weights restricted to the leading principal "
                    "directions of its activations, measured on the calibration data. Each goal below "
                    "is one way of asking for it; nothing here changes the model.",
    "goals": "One row per goal: the network's learnables after compressing with it, the share "
             "removed, the explained variance kept (averaged over the analysed layers, weighted by "
             "their learnables) and whether the goal was reached.",
    "layers": "One row per layer that holds learnables or could be projected: its largest possible "
              "reduction, the reduction that loses no variance, then, "
              f"{FORMS_LEGEND}.",
    "tradeoff": "The curve: the explained variance the network keeps (vertical) for each share of its "
                "learnables removed (horizontal), the best allocation across layers; each goal's "
                "outcome is a point on it. The dotted lines mark the reduction that loses no variance "
                "and the largest reduction possible.",
    "learnables": "Each layer's learnables before compression and after each goal (log scale).",
    "spectra": "Per analysed layer: left, each eigenvalue of the activations' covariance divided by "
               "the largest (log scale), a fast decay meaning a few directions carry most of the "
               "variance; right, the explained variance when one side alone is projected at each "
               "rank, the dotted lines marking the explained variance goals.",
}


def write_html(reports: dict, path) -> None:
    """Write :func:`render_html` of ``reports`` (title -> AnalysisReport) to ``path``."""
    page = render_html(reports)
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(page)


def render_html(reports: dict) -> str:
    """The page: for each report, its goals and layers tables, trade-off, learnables and spectra
    (of the layers that have one: not of an LSTM / GRU of several cells)."""
    title = " / ".join(reports)
    sections = "\n".join(_section(name, report) for name, report in reports.items())
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"{sections}\n</body>\n</html>\n")


def report_tables_html(report) -> str:
    """The summary, goals and layers tables with their legends, as an HTML fragment (no plot:
    no matplotlib needed); a notebook shows it for ``report``."""
    goals = _table(*goal_rows(report, spelled_out=True), "goals") if report.goals else ""
    layers = _table(*layer_rows(report, spelled_out=True), "layers")
    unsupported = unsupported_line(report)
    return (f"<p>{html.escape(summary_line(report))}</p>\n"
            f"<h2>Goals</h2>\n{_legend('goals')}\n{goals}\n"
            f"<h2>Layers</h2>\n{_legend('layers')}\n{layers}\n"
            + (f"<p>{html.escape(unsupported)}.</p>\n" if unsupported else ""))


def _section(name: str, report) -> str:
    ev_goals = [info.goal.value for info in report.goals.values() if not info.goal.is_budget]
    spectra = "\n".join(
        f"<h3>{html.escape(layer.name)} ({html.escape(layer.type)})</h3>\n"
        + _image(spectrum_png(layer, ev_goals), f"spectrum of {layer.name}", "spectrum")
        for layer in report.layers.values() if layer.sides)
    return (f"<section>\n<h1>{html.escape(name)}</h1>\n{_legend('introduction')}\n"
            f"{report_tables_html(report)}"
            f"<h2>Trade-off</h2>\n{_legend('tradeoff')}\n"
            f"{_image(tradeoff_png(report), 'network trade-off curve', 'tradeoff')}\n"
            f"<h2>Learnables per layer</h2>\n{_legend('learnables')}\n"
            f"{_image(learnables_png(report), 'learnables per layer', 'learnables')}\n"
            f"{_sensitivity(report.sensitivity)}<h2>Spectra</h2>\n{_legend('spectra')}\n{spectra}\n"
            "</section>")


def _legend(part: str) -> str:
    return f"<p class=\"legend\">{html.escape(HOW_TO_READ[part])}</p>"


def _sensitivity(sensitivity) -> str:
    if sensitivity is None:
        return ""
    return ("<h2>Sensitivity</h2>\n<p>The metric (layer learnables) with one layer projected alone "
            f"at each explained variance goal, no fine-tuning; original metric "
            f"{sensitivity.original_metric:.4f}.</p>\n{_table(*sensitivity.rows(), 'sensitivity')}\n")


def _table(header, rows, css_class: str) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                     for row in rows)
    return f"<table class=\"{css_class}\">\n<tr>{head}</tr>\n{body}\n</table>"


def _image(png: bytes, alt: str, kind: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f"<img class=\"plot {kind}\" alt=\"{html.escape(alt)}\" "
            f"src=\"data:image/png;base64,{data}\">")
