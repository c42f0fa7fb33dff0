"""Plots of an analysis as PNG bytes (matplotlib, without pyplot: no backend is switched).

- :func:`tradeoff_png`: the network's learnables removed against explained variance, with
  each goal's outcome marked;
- :func:`learnables_png`: learnables per layer before and after each goal (log scale);
- :func:`spectrum_png`: one layer's eigenvalues ``lambda_j / lambda_1`` (log scale) and
  explained variance against rank, per analysed side, with the explained variance goals.
"""

from __future__ import annotations

import io

import numpy as np


DPI = 96
SIDE_STYLES = {"output": ("-", "tab:blue"), "input": ("--", "tab:orange")}
MARKED_POINTS = 32  # spectra this short get a marker per point (a 1-channel side is one point)


def require_matplotlib():
    """``matplotlib.figure.Figure``, or an ImportError that says how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("the HTML report draws its plots with matplotlib, which is not installed: "
                          "pip install 'rankwise[report]' (or pip install matplotlib).") from error
    return Figure


def tradeoff_png(report) -> bytes:
    """The trade-off curve, the goals' outcomes and the lossless / maximum reductions.

    The curve is drawn in steps: a learnables reduction goal between two of its points keeps
    at least the explained variance of the next point.
    """
    figure = require_matplotlib()(figsize=(6.4, 3.6), layout="constrained")
    axes = figure.subplots()
    axes.step(100 * report.tradeoff_reduction, report.tradeoff_explained_variance, where="pre",
              color="tab:blue", label="allocation across layers")
    for goal, info in report.goals.items():
        axes.plot(100 * info.learnables_reduction, info.explained_variance, "o",
                  label=info.goal.label(spelled_out=True))
    for fraction in report.learnables_reduction_range:
        axes.axvline(100 * fraction, color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="learnables removed (% of the network)",
             ylabel="explained variance (learnables-weighted)", title="Network trade-off")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _png(figure)


def learnables_png(report) -> bytes:
    """Grouped bars: each layer's learnables dense and after each goal."""
    names = [name for name, layer in report.layers.items() if layer.learnables > 0]
    series = {"before": [report.layers[name].learnables for name in names]}
    for goal, info in report.goals.items():
        series[info.goal.label(spelled_out=True)] = [
            info.layers[name].learnables_after if name in info.layers else report.layers[name].learnables
            for name in names]
    figure = require_matplotlib()(figsize=(max(6.4, 0.35 * len(names) * len(series)), 3.8),
                                  layout="constrained")
    axes = figure.subplots()
    width = 0.8 / len(series)
    positions = np.arange(len(names))
    for offset, (label, values) in enumerate(series.items()):
        axes.bar(positions + offset * width, values, width, label=label)
    axes.set_xticks(positions + 0.4 - width / 2, names, rotation=30, ha="right")
    axes.set(yscale="log", ylabel="learnables", title="Learnables per layer, before and after")
    axes.legend(fontsize="small", ncols=min(len(series), 4))
    return _png(figure)


def spectrum_png(layer, explained_variance_goals) -> bytes:
    """Eigenvalue decay and explained variance against rank of one analysed layer."""
    figure = require_matplotlib()(figsize=(8.0, 2.8), layout="constrained")
    eigen_axes, variance_axes = figure.subplots(1, 2)
    for side, spectrum in layer.sides.items():
        ranks = np.arange(1, len(spectrum.eigenvalues) + 1)
        top = spectrum.eigenvalues[0] if spectrum.eigenvalues[0] > 0 else 1.0
        linestyle, color = SIDE_STYLES.get(side, ("-.", "tab:green"))
        style = dict(color=color, label=side, marker="." if len(ranks) <= MARKED_POINTS else None)
        eigen_axes.semilogy(ranks, np.maximum(spectrum.eigenvalues / top, 1e-12), linestyle, **style)
        variance_axes.plot(ranks, spectrum.explained_variance, linestyle, **style)
    for goal in explained_variance_goals:
        variance_axes.axhline(goal, color="grey", linestyle=":", linewidth=1)
    eigen_axes.set(xlabel="index", ylabel="eigenvalue / largest", title=f"{layer.name}: spectrum")
    variance_axes.set(xlabel="rank", ylabel="explained variance", ylim=(0, 1.02),
                      title=f"{layer.name}: one side projected")
    for axes in (eigen_axes, variance_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return _png(figure)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
