"""EvolutionHistory.plot: axes a reader can trust (scales, ranges, no empty panel)."""

import pytest

from rankwise.evolve.history import EvolutionEvent, EvolutionHistory

pytest.importorskip("matplotlib")


def history_of(*widths, steps=None):
    """Events at ``steps`` (0, 10, 20, ... by default) with the given widths of one layer."""
    steps = steps or [10 * index for index in range(len(widths))]
    events = [EvolutionEvent(step, "start" if index == 0 else "shrink", {"0": width}, {},
                             learnables=100 * width)
              for index, (step, width) in enumerate(zip(steps, widths))]
    return EvolutionHistory(events)


def test_a_narrow_range_is_linear_and_a_wide_one_logarithmic(tmp_path):
    narrow = history_of(36, 34, 32).plot(tmp_path / "narrow.png")
    assert [axes.get_yscale() for axes in narrow.axes] == ["linear", "linear"]
    assert all(tick == int(tick) for tick in narrow.axes[0].get_yticks())
    wide = history_of(512, 64, 4).plot()
    assert [axes.get_yscale() for axes in wide.axes] == ["log", "log"]
    assert (tmp_path / "narrow.png").stat().st_size > 0


def test_the_metrics_panel_appears_only_when_metrics_were_logged():
    history = history_of(36, 32)
    assert len(history.plot().axes) == 2
    history.log(20, accuracy=0.9)
    figure = history.plot()
    assert len(figure.axes) == 3 and figure.axes[2].get_title() == "metrics"
    assert figure.axes[0].get_xlim()[1] >= 20  # the widths run to the last logged step


def test_a_one_step_history_has_sensible_ranges():
    figure = history_of(32).plot()
    widths, learnables = figure.axes
    assert widths.get_ylim() == pytest.approx((0, 1.1 * 32))
    assert learnables.get_ylim() == pytest.approx((0, 1.1 * 3200))
    assert widths.get_xlim() == (-1, 1)
    assert all(tick == int(tick) for tick in widths.get_xticks())
