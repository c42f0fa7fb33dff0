"""Plots of a width evolution: each width, the learnables and the logged metrics over training."""

from __future__ import annotations


def plot_history(history, path=None, metric_names=None):
    """Three panels against the training step: every width, the network's learnables, metrics.

    Widths and learnables are step functions (they change only at events) on log scales.

    Parameters
    ----------
    history : EvolutionHistory
    path : str or path-like, optional
        Also write the figure there (PNG by the suffix).
    metric_names : sequence of str, optional
        Metrics to draw, all logged ones by default.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (width_axes, size_axes, metric_axes) = plt.subplots(1, 3, figsize=(15, 4))
    last_step = max([e.step for e in history.events]
                    + [s for values in history.metrics.values() for s, _ in values])
    steps = [e.step for e in history.events] + [last_step]
    for name in history.events[0].widths:
        widths = [e.widths[name] for e in history.events]
        width_axes.step(steps, widths + widths[-1:], where="post", label=name)
    width_axes.set(xlabel="training step", ylabel="channels", yscale="log", title="widths")
    width_axes.legend(fontsize="x-small", ncol=2)
    learnables = [e.learnables for e in history.events]
    size_axes.step(steps, learnables + learnables[-1:], where="post")
    size_axes.set(xlabel="training step", ylabel="learnables", yscale="log", title="network learnables")
    for name in metric_names or sorted(history.metrics):
        points = history.metrics[name]
        metric_axes.plot([s for s, _ in points], [v for _, v in points], "o-", ms=3, label=name)
    metric_axes.set(xlabel="training step", title="metrics")
    if history.metrics:
        metric_axes.legend()
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=100)
    return figure
