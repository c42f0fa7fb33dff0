"""Plots of a width evolution: each width, the learnables and the logged metrics over training."""

from __future__ import annotations

LOG_SCALE_RATIO = 10.0  # counts spread over more than this factor get a log axis
FLAT_HEADROOM = 1.1  # a series that never changes is drawn from 0 to this times its value


def plot_history(history, path=None, metric_names=None):
    """Panels against the training step: every width, the network's learnables and, when any
    were logged, the metrics.

    Widths and learnables are step functions (they change only at events), on a log axis only
    when they span more than a factor of :data:`LOG_SCALE_RATIO`. A series that never changes
    (a history of one event) is drawn from 0, so that its level reads at a glance; a history
    of one step is drawn as points.

    Parameters
    ----------
    history : EvolutionHistory
    path : str or path-like, optional
        Also write the figure there (PNG by the suffix).
    metric_names : sequence of str, optional
        Metrics to draw, all logged ones by default. Without any, there is no metrics panel.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metric_names or sorted(history.metrics))
    figure, panels = plt.subplots(1, 3 if names else 2, figsize=(15 if names else 10, 4))
    first_step = min(e.step for e in history.events)
    last_step = max([e.step for e in history.events]
                    + [s for name in names for s, _ in history.metrics[name]])
    steps = [e.step for e in history.events] + [last_step]
    marker = "o" if first_step == last_step else None  # a line of no length shows as a point
    width_axes, size_axes = panels[:2]
    for name in history.events[0].widths:
        widths = [e.widths[name] for e in history.events]
        width_axes.step(steps, widths + widths[-1:], where="post", label=name, marker=marker)
    width_axes.set(ylabel="channels", title="widths")
    width_axes.legend(fontsize="x-small", ncol=2)
    _count_axis(width_axes, [w for e in history.events for w in e.widths.values()])
    learnables = [e.learnables for e in history.events]
    size_axes.step(steps, learnables + learnables[-1:], where="post", marker=marker)
    size_axes.set(ylabel="learnables", title="network learnables")
    _count_axis(size_axes, learnables)
    if names:
        metric_axes = panels[2]
        for name in names:
            points = history.metrics[name]
            metric_axes.plot([s for s, _ in points], [v for _, v in points], "o-", ms=3, label=name)
        metric_axes.set(title="metrics")
        metric_axes.legend()
        _flat_from_zero(metric_axes, [v for name in names for _, v in history.metrics[name]])
    for axes in panels:
        _step_axis(axes, first_step, last_step)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=100)
    return figure


def _count_axis(axes, values) -> None:
    """Log scale for counts spread over more than :data:`LOG_SCALE_RATIO`, else linear with
    whole-number ticks."""
    from matplotlib.ticker import MaxNLocator

    if min(values) > 0 and max(values) / min(values) > LOG_SCALE_RATIO:
        axes.set_yscale("log")
        return
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    _flat_from_zero(axes, values)


def _flat_from_zero(axes, values) -> None:
    """A series that never changes: from 0 (or its negative value) to :data:`FLAT_HEADROOM` times it."""
    if min(values) == max(values) != 0:
        value = values[0]
        axes.set_ylim(*sorted((0.0, FLAT_HEADROOM * value)))


def _step_axis(axes, first_step: int, last_step: int) -> None:
    """Training steps on whole-number ticks; one step gets a step either side."""
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel("training step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if first_step == last_step:
        axes.set_xlim(first_step - 1, last_step + 1)
