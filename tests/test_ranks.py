"""The decisions package (rankwise.ranks): the criterion seam, and the one builder of rankwise.projection."""

import numpy as np
import pytest
import torch

import rankwise as rw
from conftest import assert_unchanged, make_batches, state_of, tiny_cnn, tiny_mlp
from rankwise.goals import Goal
from rankwise.projection import Decisions, build_projected
from rankwise.ranks import CRITERIA, Criterion, allocate_learnables_reduction, choose_ranks, layer_options
from rankwise.ranks.criterion import variance_error


@pytest.fixture
def mlp_statistics():
    torch.manual_seed(0)
    model = tiny_mlp().eval()
    return model, rw.NeuronPCA(model, make_batches((32, 12)), verbosity="off")


def test_the_variance_criterion_error_is_the_residual(model_and_data):
    model, data = model_and_data
    npca = rw.NeuronPCA(model, data, verbosity="off")
    for name in npca.layer_names:
        options = layer_options(npca, name)
        np.testing.assert_array_equal(options.error, options.residual)
        assert np.all(np.diff(options.learnables) > 0) and np.all(np.diff(options.error) < 0)
        assert options.error[-1] == 0 and options.choice(0).error == options.error[0]


def test_recurrent_cells_errors_add_up_to_the_layer_residual():
    torch.manual_seed(0)
    model = torch.nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True).eval()
    npca = rw.NeuronPCA(model, make_batches((4, 7, 5)), verbosity="off")
    options = layer_options(npca, "")
    np.testing.assert_allclose(options.error, options.residual, rtol=1e-9, atol=1e-12)


def test_a_new_criterion_is_one_function_and_steers_the_allocation(monkeypatch, mlp_statistics):
    """A criterion that calls layer "0"'s errors costly keeps it denser than the variance one."""
    model, npca = mlp_statistics

    def protect_first(npca, name, cell, candidates):
        return variance_error(npca, name, cell, candidates) * (1e6 if name == "0" else 1.0)

    monkeypatch.setitem(CRITERIA, "protect_first", Criterion("protect_first", protect_first))
    total = rw.count_learnables(model)
    plain = {n: layer_options(npca, n) for n in npca.layer_names}
    steered = {n: layer_options(npca, n, criterion="protect_first") for n in npca.layer_names}
    plain_pick = allocate_learnables_reduction(plain, 0.4, total).chosen
    steered_pick = allocate_learnables_reduction(steered, 0.4, total).chosen
    assert plain["0"].learnables[plain_pick["0"]] < steered["0"].learnables[steered_pick["0"]]
    np.testing.assert_array_equal(steered["2"].error, plain["2"].error)


def test_an_unknown_criterion_is_refused(mlp_statistics):
    _, npca = mlp_statistics
    with pytest.raises(ValueError, match="criterion: expected one of 'variance'"):
        layer_options(npca, "0", criterion="loss?")


@pytest.mark.parametrize("goal_name, goal", [("explained_variance_goal", 0.9), ("learnables_reduction_goal", 0.5)])
def test_build_projected_from_explicit_decisions_is_what_compress_builds(goal_name, goal):
    torch.manual_seed(0)
    model, data = tiny_cnn().eval(), make_batches((32, 3, 8, 8))
    npca = rw.NeuronPCA(model, data, verbosity="off")
    snapshot = state_of(model)
    expected_net, expected = rw.compress_network_using_projection(model, npca, **{goal_name: goal}, verbosity="off",
                                                                  criterion="variance", allocation="global")
    layers = {name: model.get_submodule(name) for name in npca.layer_names}
    options = {name: layer_options(npca, name) for name in layers}
    choices, reached = choose_ranks(options, Goal(goal_name.removesuffix("_goal"), goal), rw.count_learnables(model))
    decisions = Decisions(Goal(goal_name.removesuffix("_goal"), goal), choices, reached)
    net, info = build_projected(model, layers, options, decisions)
    dry_net, dry_info = build_projected(model, layers, options, decisions, build=False)
    assert info == expected == dry_info and dry_net is None
    assert repr(net) == repr(expected_net)
    x = make_batches((4, 3, 8, 8), count=1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected_net(x), rtol=0, atol=0)
    assert_unchanged(model, snapshot)


@pytest.mark.parametrize("progress", [True, False])
def test_the_options_show_a_progress_bar_only_when_asked(mlp_statistics, monkeypatch, capsys, progress):
    from rankwise.ranks import frontier

    model, npca = mlp_statistics
    monkeypatch.setattr(frontier, "PROGRESS_DELAY_SECONDS", 0)  # the bar appears at once
    layers = {name: model.get_submodule(name) for name in npca.layer_names}
    options = frontier.measured_options(model, npca, layers, progress=progress)
    assert set(options) == set(layers)
    shown = "spectra and options" in capsys.readouterr().err
    assert shown == progress
