"""rw.analyze and its report: per-layer analysis, the network's trade-off curve, table, JSON, HTML."""

import numpy as np
import pytest

import rankwise as rw
from rankwise.ranks import layer_options, tradeoff_curve


def test_side_residuals_cover_each_analysed_side(model_and_data):
    model, data = model_and_data
    npca = rw.NeuronPCA(model, data, verbosity="off")
    for name in npca.layer_names:
        stats, options = npca.statistics(name), layer_options(npca, name)
        expected = {"output"} if stats.kind == "linear" else {"input", "output"}
        assert set(options.side_residuals) == expected
        for side, residual in options.side_residuals.items():
            width = stats.out_channels if side == "output" else stats.in_channels
            assert residual.shape == (width,)
            assert np.all(np.diff(residual) <= 0) and residual[-1] == pytest.approx(0, abs=1e-9)


def test_tradeoff_curve_follows_the_global_allocation(model_and_data):
    model, data = model_and_data
    npca = rw.NeuronPCA(model, data, verbosity="off")
    options = {name: layer_options(npca, name) for name in npca.layer_names}
    reduction, explained = tradeoff_curve(options, npca.network_learnables)
    assert (reduction[0], explained[0]) == (0.0, 1.0)
    assert np.all(np.diff(reduction) > 0) and np.all(np.diff(explained) <= 1e-12)
    assert reduction[-1] == pytest.approx(npca.learnables_reduction_range[1])
    for goal, curve_explained in zip(reduction[1:], explained[1:]):
        _, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=goal,
                                                       verbosity="off")
        assert info.learnables_reduction >= goal - 1e-12
        assert info.explained_variance >= curve_explained - 1e-9
