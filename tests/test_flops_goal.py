"""flops_reduction_goal: FLOPs on an example batch, allocated by error per FLOP saved.

Every assertion compares counts (rw.count_flops against the decisions' own arithmetic) or
outputs; nothing here is timed.
"""

import numpy as np
import pytest
import torch
from torch import nn

import rankwise as rw
from conftest import TINY_MODELS, assert_unchanged, make_batches, state_of
from rankwise.flops import flop_budget
from rankwise.layers import ProjectedConv
from rankwise.ranks import measured_options
from rankwise.ranks.costs import factored_flops


def compressed(name, goal, **options):
    torch.manual_seed(0)
    factory, shape = TINY_MODELS[name]
    model, batches = factory().eval(), make_batches(shape)
    net, info = rw.compress_network_using_projection(model, batches, flops_reduction_goal=goal,
                                                     verbosity="off", **options)
    return model, batches, net, info


def largest_frontier_step(model, batches, info):
    """The most FLOPs between two neighbouring options of one layer's FLOPs frontier."""
    npca = rw.NeuronPCA(model, batches, verbosity="off", loss_fn=None)
    layers = {name: model.get_submodule(name) for name in npca.layer_names}
    budget = flop_budget(model, layers, npca.validation_batches[0])
    priced, _ = budget.priced(measured_options(model, npca, layers))
    return max(int(np.diff(opts.learnables).max(initial=0)) for opts in priced.values())


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("goal", [0.2, 0.5])
def test_flops_goal_is_met_within_one_rank_step(name, goal):
    model, batches, net, info = compressed(name, goal, criterion="variance", allocation="global")
    example = batches[1]  # the first held-out batch: the default example
    before, after = rw.count_flops(model, example), rw.count_flops(net, example)
    assert (info.flops_before, info.flops_after) == (before, after)  # the decisions' arithmetic is the counter's
    assert info.goal_reached and after <= (1 - goal) * before
    assert (1 - goal) * before - after < largest_frontier_step(model, batches, info)
    assert info.flops_reduction == pytest.approx(1 - after / before)
    assert str(info.goal) == f"flops_reduction_goal={goal:g}" and "FLOPs on the example batch" in info.table()


def test_flops_goal_works_with_the_measured_choice():
    model, batches, net, info = compressed("cnn", 0.4)
    assert info.measured is not None and len(info.candidates) >= 2
    assert all(s.score is not None for s in info.candidates)
    assert rw.count_flops(net, batches[0]) <= 0.6 * rw.count_flops(model, batches[0])


def test_explicit_flops_input_sets_the_count():
    model, batches, net, info = compressed("mlp", 0.3, flops_input=torch.randn(3, 12), validation=None,
                                       criterion="variance", allocation="global")
    assert info.flops_before == rw.count_flops(model, torch.randn(3, 12)) == 2 * 3 * (12 * 24 + 24 * 16 + 16 * 5)


def test_goal_above_the_maximum_removes_the_maximum_and_warns():
    with pytest.warns(UserWarning, match="FLOPs"):
        _, _, net, info = compressed("mlp", 1.0, criterion="variance", allocation="global")
    assert not info.goal_reached and info.flops_after < info.flops_before


@pytest.mark.parametrize("other", ["explained_variance_goal", "learnables_reduction_goal"])
def test_flops_goal_is_exclusive_with_the_other_goals(other):
    model, batches = TINY_MODELS["mlp"][0](), make_batches((32, 12))
    snapshot = state_of(model)
    with pytest.raises(ValueError, match=f"{other} and flops_reduction_goal are exclusive"):
        rw.compress_network_using_projection(model, batches, flops_reduction_goal=0.5, verbosity="off",
                                             **{other: 0.5})
    with pytest.raises(ValueError, match="flops_reduction_goal"):
        rw.compress_network_using_projection(model, batches, flops_reduction_goal=1.5, verbosity="off")
    assert_unchanged(model, snapshot)


@pytest.mark.parametrize("side", ["input", "output", "both"])
@pytest.mark.parametrize("stride", [1, 2])
def test_option_flops_are_the_built_layers_flops(side, stride):
    conv, x = nn.Conv2d(6, 10, 3, stride=stride, padding=1), torch.randn(2, 6, 9, 9)
    budget = flop_budget(conv, {"": conv}, x)
    r_in, r_out = (4 if side in ("input", "both") else None), (5 if side in ("output", "both") else None)
    built = ProjectedConv.from_dense(conv, input_basis=None if r_in is None else torch.eye(6)[:, :r_in],
                                     output_basis=None if r_out is None else torch.eye(10)[:, :r_out])
    assert factored_flops(budget.layers[""], r_in, r_out) == rw.count_flops(built, x)
    assert budget.network_flops == budget.layers[""].dense_flops == rw.count_flops(conv, x)


def test_full_rank_factors_are_exact_and_count_their_flops():
    conv, x = nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 7, 7)
    built = ProjectedConv.from_dense(conv, input_basis=torch.linalg.qr(torch.randn(4, 4))[0],
                                     output_basis=torch.linalg.qr(torch.randn(6, 6))[0])
    torch.testing.assert_close(built(x), conv(x), rtol=1e-5, atol=1e-5)
    budget = flop_budget(conv, {"": conv}, x)
    assert factored_flops(budget.layers[""], 4, 6) == rw.count_flops(built, x)


def test_zero_goal_keeps_the_outputs():
    model, batches, net, info = compressed("cnn", 0.0, criterion="variance", allocation="global")
    torch.testing.assert_close(net(batches[0]), model(batches[0]), rtol=1e-4, atol=1e-4)
    assert info.flops_after <= info.flops_before


def test_without_an_example_batch_the_error_names_flops_input():
    model, batches = TINY_MODELS["mlp"][0](), make_batches((32, 12))
    snapshot = state_of(model)
    with pytest.raises(ValueError, match="flops_input: .*none is known"):
        rw.compress_network_using_projection(model, batches, flops_reduction_goal=0.5, validation=None,
                                             verbosity="off")
    assert_unchanged(model, snapshot)


def test_an_input_the_model_rejects_names_flops_input():
    model, batches = TINY_MODELS["mlp"][0](), make_batches((32, 12))
    snapshot = state_of(model)
    with pytest.raises(ValueError, match="flops_input: the model's forward failed on it"):
        rw.compress_network_using_projection(model, batches, flops_reduction_goal=0.5,
                                             flops_input=torch.randn(4, 7), verbosity="off")
    assert_unchanged(model, snapshot)


class ShapeBranches(nn.Module):
    """Takes one of two layers by the width of its input: a shape the FLOP count must follow."""

    def __init__(self):
        super().__init__()
        self.wide, self.narrow = nn.Linear(12, 6), nn.Linear(4, 6)

    def forward(self, x):
        return self.wide(x) if x.shape[-1] == 12 else self.narrow(x)


def test_an_input_that_skips_a_layer_names_it():
    model = ShapeBranches()
    batches = make_batches((16, 12)) + make_batches((16, 4))
    with pytest.raises(ValueError, match="flops_input: the model's forward on it did not call narrow"):
        rw.compress_network_using_projection(model, batches, flops_reduction_goal=0.3,
                                             flops_input=torch.randn(2, 12), verbosity="off")


class Lookup(nn.Module):
    def __init__(self):
        super().__init__()
        self.table, self.head = nn.Embedding(50, 16), nn.Linear(16, 16)

    def forward(self, tokens):
        return self.head(self.table(tokens))


def test_unpriced_layers_stay_dense_under_a_flops_goal():
    torch.manual_seed(0)
    batches = [torch.randint(0, 50, (8, 5)) for _ in range(6)]
    _, info = rw.compress_network_using_projection(Lookup(), batches, flops_reduction_goal=0.3,
                                                   criterion="variance", allocation="global", verbosity="off")
    assert info.layers["table"].side == "dense" and info.layers["head"].side != "dense"
    assert info.flops_after <= 0.7 * info.flops_before


def test_round_to_makes_every_projected_rank_a_multiple():
    _, _, net, info = compressed("cnn", 0.3, criterion="variance", allocation="global", round_to=4)
    ranks = [r for p in info.layers.values() for r in (p.rank_in, p.rank_out) if r is not None]
    assert ranks and all(r % 4 == 0 for r in ranks)
    assert info.goal_reached and info.flops_after <= 0.7 * info.flops_before


@pytest.mark.parametrize("options, message", [
    ({"flops_reduction_goal": 0.5, "round_to": 0}, "round_to: expected a positive integer"),
    ({"learnables_reduction_goal": 0.5, "round_to": 8}, "round_to: it rounds the ranks of a flops_reduction_goal")])
def test_round_to_errors_name_it(options, message):
    model, batches = TINY_MODELS["cnn"][0](), make_batches((32, 3, 8, 8))
    with pytest.raises(ValueError, match=message):
        rw.compress_network_using_projection(model, batches, verbosity="off", **options)


@pytest.mark.parametrize("shape", [(2, 6, 5, 5), (6, 5, 5)])
def test_projected_convolution_runs_the_same_in_every_memory_format(shape):
    conv = nn.Conv2d(6, 10, 3, padding=1)
    built = ProjectedConv.from_dense(conv, input_basis=torch.linalg.qr(torch.randn(6, 6))[0][:, :4],
                                     output_basis=torch.linalg.qr(torch.randn(10, 10))[0][:, :5])
    x = torch.randn(*shape)
    reference = built.unpack()(x)
    torch.testing.assert_close(built(x), reference, rtol=1e-5, atol=1e-5)
    if x.dim() == 4:
        fast = built.to(memory_format=torch.channels_last)
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), reference,
                                   rtol=1e-5, atol=1e-5)


def test_analyze_reports_flops_goals_as_compression_reaches_them():
    torch.manual_seed(0)
    model, batches = TINY_MODELS["cnn"][0]().eval(), make_batches((32, 3, 8, 8))
    report = rw.analyze(model, batches, flops_reduction_goals=(0.4,), verbosity="off")
    outcome = report.goals["flops_reduction_goal=0.4"]
    _, info = rw.compress_network_using_projection(model, batches, flops_reduction_goal=0.4, validation=None,
                                                   flops_input=batches[0], criterion="variance",
                                                   allocation="global", verbosity="off")
    assert (outcome.flops_before, outcome.flops_after) == (info.flops_before, info.flops_after)
    assert outcome.flops_after <= 0.6 * outcome.flops_before
    assert "FLOPs removed" in report.table() and "flops-40%" in report.table()


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(6, 8, batch_first=True), nn.Linear(8, 12)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def test_a_recurrent_layer_stays_dense_and_its_flops_are_counted():
    torch.manual_seed(0)
    batches = make_batches((4, 5, 6))
    model = Recurrent()
    _, info = rw.compress_network_using_projection(model, batches, flops_reduction_goal=0.05,
                                                   criterion="variance", allocation="global", verbosity="off")
    assert info.layers["lstm"].side == "dense"
    assert info.flops_before == rw.count_flops(model, batches[1])
