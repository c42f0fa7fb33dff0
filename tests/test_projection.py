"""compress_network_using_projection and unpack_projected_layers, end to end on tiny models."""

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise import io as rankwise_io
from rankwise.goals import Goal
from conftest import (assert_goal_met_by_the_built_modules, assert_unchanged, low_rank_linear,
                      make_batches, state_of, tiny_cnn, tiny_mlp)


def low_rank_network():
    """Linear layers of known rank: 3 (16 -> 20) and 4 (20 -> 6)."""
    return nn.Sequential(low_rank_linear(16, 20, 3, seed=1), nn.Tanh(), low_rank_linear(20, 6, 4, seed=2))


def max_error(a, b, data):
    with torch.no_grad():
        return max((a(x) - b(x)).abs().max().item() for x in data)


def test_lossless_projection_of_low_rank_layers_is_exact():
    torch.manual_seed(0)
    model, data = low_rank_network(), make_batches((64, 16))
    net, info = rw.compress_network_using_projection(model, data, explained_variance_goal=1.0,
                                                     verbosity="off")
    assert info.layers["0"].side != "dense"
    assert max(r for r in (info.layers["0"].rank_in, info.layers["0"].rank_out) if r) == 3
    assert info.learnables_reduction > 0
    assert max_error(net, model, make_batches((64, 16), seed=5)) < 1e-5


@pytest.mark.parametrize("goal", [0.5, 0.9, 0.99])
def test_explained_variance_goal_is_honoured_per_layer(model_and_data, goal):
    model, data = model_and_data
    npca = rw.NeuronPCA(model, data, verbosity="off")
    net, info = rw.compress_network_using_projection(model, npca, explained_variance_goal=goal,
                                                     verbosity="off")
    assert all(p.explained_variance >= goal - 1e-9 for p in info.layers.values())
    assert all(p.learnables_after < p.learnables_before for p in info.layers.values() if p.side != "dense")
    assert info.learnables_after == rw.count_learnables(net)


@pytest.mark.parametrize("goal", [0.2, 0.5, 0.8])
def test_learnables_reduction_goal_is_honoured(model_and_data, goal):
    model, data = model_and_data
    npca = rw.NeuronPCA(model, data, verbosity="off")
    low, high = npca.learnables_reduction_range
    net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=goal,
                                                     verbosity="off")
    assert_goal_met_by_the_built_modules(net, info, goal, high)


def test_goal_above_the_maximum_removes_the_maximum():
    torch.manual_seed(0)
    model, data = tiny_cnn(), make_batches((32, 3, 8, 8))
    npca = rw.NeuronPCA(model, data, verbosity="off")
    _, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=1.0, verbosity="off")
    assert not info.goal_reached
    assert info.learnables_reduction == pytest.approx(npca.learnables_reduction_range[1])
    assert "not reachable" in info.table()


def test_removal_that_costs_no_variance_is_always_taken():
    torch.manual_seed(0)
    model, data = low_rank_network(), make_batches((64, 16))
    npca = rw.NeuronPCA(model, data, verbosity="off")
    lossless, _ = npca.learnables_reduction_range
    assert lossless > 0.3
    _, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.01, verbosity="off")
    assert info.learnables_reduction == pytest.approx(lossless)
    assert info.explained_variance > 1 - 1e-6


def test_global_allocation_prefers_the_cheap_layer():
    """Two equal layers, one with low-rank outputs: the goal is met by compressing that one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 40))
    with torch.no_grad():
        model[2].weight.copy_(low_rank_linear(40, 40, 4).weight + 1e-3 * torch.randn(40, 40))
    npca = rw.NeuronPCA(model, make_batches((128, 40)), verbosity="off")
    _, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.3, verbosity="off")
    assert info.layers["0"].side == "dense"
    assert info.layers["2"].side != "dense"
    assert info.layers["2"].explained_variance > 0.999


def test_layer_names_are_honoured():
    torch.manual_seed(0)
    model, data = tiny_cnn(), make_batches((32, 3, 8, 8))
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.9,
                                                     layer_names=["5"], verbosity="off")
    assert list(info.layers) == ["5"] and info.layer_names == ["5"]
    assert type(net[0]) is nn.Conv2d and type(net[2]) is nn.Conv2d
    assert isinstance(net[5], rw.ProjectedLinear)


def test_input_model_is_not_mutated_unless_inplace():
    torch.manual_seed(0)
    model, data = tiny_cnn(), make_batches((32, 3, 8, 8))
    snapshot = state_of(model)
    net, _ = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.5, verbosity="off")
    assert_unchanged(model, snapshot)
    assert net is not model
    same, _ = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.5,
                                                   verbosity="off", inplace=True)
    assert same is model and any(isinstance(m, rw.ProjectedLayer) for m in model.modules())
    assert max_error(same, net, data) == 0


def test_unpack_gives_plain_layers_and_the_same_outputs(model_and_data):
    model, data = model_and_data
    net, _ = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.5, verbosity="off")
    unpacked = rw.unpack_projected_layers(net)
    assert not any(isinstance(m, rw.ProjectedLayer) for m in unpacked.modules())
    assert {type(m).__module__.split(".")[0] for m in unpacked.modules() if m is not unpacked} == {"torch"}
    assert max_error(unpacked, net, data) < 1e-6
    assert any(isinstance(m, rw.ProjectedLayer) for m in net.modules())  # not mutated
    direct, _ = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.5,
                                                     unpack=True, verbosity="off")
    assert max_error(direct, unpacked, data) == 0


def test_unpack_a_single_wrapper():
    layer = rw.ProjectedLinear.from_dense(nn.Linear(4, 3), output_basis=torch.eye(3)[:, :2])
    assert isinstance(rw.unpack_projected_layers(layer), nn.Sequential)


def test_thin_calibration_degrades_toward_truncated_svd_instead_of_collapsing():
    """A 100-class linear classifier calibrated on 16 samples, 40% of learnables removed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 100))
    u, _ = torch.linalg.qr(torch.randn(100, 64))
    v, _ = torch.linalg.qr(torch.randn(64, 64))
    with torch.no_grad():  # a trained layer's decaying spectrum
        model[0].weight.copy_(u @ torch.diag(torch.exp(-torch.arange(64.0) / 8)) @ v.T)
    thin = [torch.randn(16, 64)]
    test = torch.randn(2000, 64)

    def top1_agreement(regularization):
        npca = rw.NeuronPCA(model, thin, verbosity="off", regularization=regularization)
        net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.4,
                                                         verbosity="off")
        assert info.learnables_reduction >= 0.4
        with torch.no_grad():
            return (net(test).argmax(1) == model(test).argmax(1)).float().mean().item()

    with pytest.warns(rw.ThinDataWarning):
        regularised, naive, data_free = top1_agreement("auto"), top1_agreement(0.0), top1_agreement(1.0)
    assert regularised > naive + 0.15            # measured here: 0.915 against 0.705
    assert regularised >= data_free - 0.02       # no worse than truncated SVD (0.913)


def test_summary_table_and_verbosity_levels(capsys):
    torch.manual_seed(0)
    model, data = tiny_mlp(), make_batches((32, 12))
    npca = rw.NeuronPCA(model, data, verbosity="off")
    _, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.5, verbosity="off")
    assert capsys.readouterr().out == ""
    rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.5, verbosity="summary")
    summary = capsys.readouterr().out
    assert summary.strip() == info.table() and "removed" in summary and "explained var." in summary
    rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.5, verbosity="steps")
    steps = capsys.readouterr().out
    assert all(f"{name}: " in steps for name in info.layers)
    rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.5, verbosity="iterations")
    assert "allocation step 1:" in capsys.readouterr().out


# Bad input: a clear error, and the model is left as it was ---------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"explained_variance_goal": 0.9, "learnables_reduction_goal": 0.5}, "exclusive"),
    ({"explained_variance_goal": 1.5}, "explained_variance_goal: expected a number in \\[0, 1\\]"),
    ({"learnables_reduction_goal": -0.1}, "learnables_reduction_goal: expected"),
    ({"learnables_reduction_goal": "half"}, "learnables_reduction_goal: expected"),
    ({"layer_names": ["5", "missing"]}, "'missing' is not a layer of the model. Projectable layers: 0, 2, 5"),
    ({"layer_names": ["4"]}, "'4' cannot be projected: Flatten layers are not supported"),
    ({"verbosity": "all"}, "verbosity"),
])
def test_bad_arguments_raise_clearly_and_leave_the_model(kwargs, message):
    torch.manual_seed(0)
    model = tiny_cnn()
    snapshot = state_of(model)
    with pytest.raises(ValueError, match=message):
        rw.compress_network_using_projection(model, make_batches((32, 3, 8, 8)),
                                             **{"verbosity": "off", **kwargs})
    assert_unchanged(model, snapshot)


def test_statistics_of_other_layers_or_models_are_rejected():
    torch.manual_seed(0)
    model, data = tiny_cnn(), make_batches((32, 3, 8, 8))
    partial = rw.NeuronPCA(model, data, layer_names=["5"], verbosity="off")
    with pytest.raises(ValueError, match="no statistics for layer '0'"):
        rw.compress_network_using_projection(model, partial, verbosity="off", inplace=True)
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(108, 7))
    snapshot = state_of(other)
    with pytest.raises(ValueError, match="computed on another model"):
        rw.compress_network_using_projection(other, rw.NeuronPCA(model, data, verbosity="off"),
                                             verbosity="off", inplace=True)
    assert_unchanged(other, snapshot)


def test_default_goal_is_explained_variance_095():
    torch.manual_seed(0)
    model, data = tiny_mlp(), make_batches((32, 12))
    _, info = rw.compress_network_using_projection(model, data, verbosity="off")
    assert str(info.goal) == "explained_variance_goal=0.95" and info.goal == Goal("explained_variance", 0.95)


def test_a_goal_below_what_is_lossless_removes_about_the_goal():
    """Past the goal, only lossless steps are taken: a lossy layer is not squeezed further."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
    npca = rw.NeuronPCA(model, make_batches((512, 64)), verbosity="off")
    assert npca.learnables_reduction_range[0] < 0.01
    _, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.3,
                                                   verbosity="off")
    assert 0.3 <= info.learnables_reduction < 0.33


def test_exclude_leaves_layers_dense_and_the_info_lists_them(tmp_path):
    torch.manual_seed(0)
    model, data = tiny_mlp().eval(), make_batches((32, 12))
    snapshot = state_of(model)
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.3,
                                                     exclude="2", verbosity="off")
    assert info.excluded == ["2"] and list(info.layers) == ["0", "4"]
    assert type(net[2]) is nn.Linear and torch.equal(net[2].weight, model[2].weight)
    assert info.table().splitlines()[-1] == "excluded: 2"
    _, everything = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.3,
                                                         verbosity="off")
    assert everything.excluded == [] and "excluded" not in everything.table()
    _, chosen = rw.compress_network_using_projection(model, data, layer_names=["0", "2"], exclude=["0"],
                                                     verbosity="off")
    assert list(chosen.layers) == ["2"] and chosen.excluded == ["0"]
    rw.save(net, tmp_path / "net.safetensors", info=info)
    spec = rankwise_io.read_spec(tmp_path / "net.safetensors")
    assert rankwise_io.projection_info(spec) == info
    del spec["projection"]["excluded"]  # a file saved before the field existed
    assert rankwise_io.projection_info(spec).excluded == []
    assert_unchanged(model, snapshot)


@pytest.mark.parametrize("exclude, message", [
    ("nope", "exclude: 'nope' is not a layer of the model"),
    (["0", "2", "4"], "exclude: it leaves no layer to be projected"),
])
def test_bad_exclude_is_refused_and_leaves_the_model(exclude, message):
    torch.manual_seed(0)
    model = tiny_mlp()
    snapshot = state_of(model)
    with pytest.raises(ValueError, match=message):
        rw.compress_network_using_projection(model, make_batches((32, 12)), exclude=exclude, verbosity="off")
    assert_unchanged(model, snapshot)
