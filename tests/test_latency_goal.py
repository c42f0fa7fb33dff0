"""latency_reduction_goal: options priced in measured seconds, each decision built and timed.

The pricing and the rounds are checked with a stand-in clock (seconds proportional to a form's
learnables plus a fixed cost per call), so that every assertion is an identity; one test runs
the real clock and asserts only what holds whatever the machine's speed.
"""

import warnings

import numpy as np
import pytest
import torch

import rankwise as rw
import rankwise.latency
import rankwise.latency_aware
import rankwise.latency_budget
from conftest import TINY_MODELS, assert_unchanged, make_batches, state_of
from rankwise.goals import Goal
from rankwise.latency import SpeedComparison
from rankwise.latency_budget import LatencyBudget, meet_latency_goal
from rankwise.ranks import RankChoice, measured_options
from rankwise.ranks.costs import priced_subset

CALL_SECONDS, SECONDS_PER_LEARNABLE = 1e-6, 1e-9


def stand_in_seconds(module, *_):
    """The stand-in clock: a fixed cost per call plus one nanosecond per learnable."""
    return CALL_SECONDS + SECONDS_PER_LEARNABLE * rw.count_learnables(module)


@pytest.fixture
def stand_in_clock(monkeypatch):
    monkeypatch.setattr(rankwise.latency_aware, "time_layer", stand_in_seconds)
    monkeypatch.setattr(rankwise.latency, "median_latency", stand_in_seconds)
    monkeypatch.setattr(rankwise.latency, "compare_speed", lambda original, compressed, x: SpeedComparison(
        0, 0, stand_in_seconds(original), stand_in_seconds(compressed)))


def tiny(name="mlp"):
    torch.manual_seed(0)
    factory, shape = TINY_MODELS[name]
    return factory().eval(), make_batches(shape)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_options_are_priced_by_interpolating_the_timed_ones(name, stand_in_clock):
    model, batches = tiny(name)
    npca = rw.NeuronPCA(model, batches, verbosity="off", loss_fn=None)
    layers = {n: model.get_submodule(n) for n in npca.layer_names}
    options = measured_options(model, npca, layers)
    budget = LatencyBudget(model, layers, {n: ((), {}) for n in layers}, stand_in_seconds(model))
    for layer_name, opts in options.items():
        seconds = budget.option_seconds(opts)
        # a form's learnables are its option's learnables, so the interpolation is exact here
        np.testing.assert_allclose(seconds, CALL_SECONDS + SECONDS_PER_LEARNABLE * opts.learnables, rtol=1e-9)
    dense_only = priced_subset(opts, np.array([opts.dense_index]), opts.learnables[[opts.dense_index]])
    assert budget.option_seconds(dense_only).tolist() == [CALL_SECONDS + SECONDS_PER_LEARNABLE * opts.dense_learnables]
    priced, back = budget.priced(options)
    for layer_name, opts in priced.items():
        dense = stand_in_seconds(layers[layer_name])
        assert opts.learnables[-1] == round(1e9 * dense)
        step = 1e9 * rankwise.latency_budget.TIMING_RESOLUTION * dense
        np.testing.assert_allclose(opts.learnables / step, np.round(opts.learnables / step), atol=0.01)  # whole ns
        assert (opts.learnables[:-1] < opts.learnables[-1]).all()  # only options faster than dense
        assert (np.diff(opts.error) < 0).all() and back[layer_name][-1] == options[layer_name].dense_index


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_the_outcome_is_the_measured_one(name, stand_in_clock):
    model, batches = tiny(name)
    x = batches[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net, info = rw.compress_network_using_projection(model, batches, latency_reduction_goal=0.3, latency_input=x,
                                                         criterion="variance", allocation="global", verbosity="off")
    assert info.goal == Goal("latency_reduction", 0.3)
    assert info.latency_before == stand_in_seconds(model) and info.latency_after == stand_in_seconds(net)
    assert info.goal_reached == (info.latency_reduction >= 0.3)
    unreached = [str(w.message) for w in caught if "was not reached as measured" in str(w.message)]
    assert len(unreached) == (not info.goal_reached)
    assert "latency on latency_input (measured)" in info.table()
    if name != "sequence":  # its three small layers' fixed cost per call keeps it under 30%
        assert info.goal_reached


def projected_at(goal):
    """A stand-in decision: one projected layer, its rank telling the target it was decided at."""
    return {"layer": RankChoice("output", None, round(100 * goal.value), 0, 0.0, 0.0)}


def test_a_raised_target_follows_the_shortfall(monkeypatch):
    measured = iter([0.10, 0.25, 0.31])
    monkeypatch.setattr(rankwise.latency, "compare_speed",
                        lambda *_: SpeedComparison(0, 0, 1.0, 1.0 - next(measured)))
    targets = []

    def decide(goal):
        targets.append(goal.value)
        return projected_at(goal), True, {}, []

    outcome, comparison, warnings = meet_latency_goal(Goal("latency_reduction", 0.3), decide, lambda c: c,
                                                      None, None)
    np.testing.assert_allclose(targets, [0.3, 0.5, 0.55])
    assert outcome[0]["layer"].rank_out == 55 and outcome[1:] == (True, {}, []) and warnings == []
    assert comparison.seconds_after == pytest.approx(0.69)


def test_an_unreached_goal_keeps_the_best_round_and_says_so(monkeypatch):
    measured = iter([0.10, 0.20, 0.15])
    monkeypatch.setattr(rankwise.latency, "compare_speed",
                        lambda *_: SpeedComparison(0, 0, 1.0, 1.0 - next(measured)))
    outcome, comparison, warnings = meet_latency_goal(
        Goal("latency_reduction", 0.3), lambda goal: (projected_at(goal), True, {}, []), lambda c: c, None, None)
    assert outcome[0]["layer"].rank_out == 50 and outcome[1] is False
    assert len(warnings) == 1 and "20.0% of the latency" in warnings[0] and "3 round(s)" in warnings[0]
    assert "cannot be made faster" in warnings[0]


def test_rounds_stop_once_the_allocation_is_at_its_maximum(monkeypatch):
    monkeypatch.setattr(rankwise.latency, "compare_speed", lambda *_: SpeedComparison(0, 0, 1.0, 0.9))
    calls = []
    _, _, warnings = meet_latency_goal(Goal("latency_reduction", 0.5),
                                       lambda goal: calls.append(goal) or (projected_at(goal), False, {}, []),
                                       lambda c: c, None, None)
    assert len(calls) == 1 and "every layer took its fastest form" in warnings[0]


def test_when_no_layer_gets_faster_nothing_is_built_or_compared(monkeypatch):
    monkeypatch.setattr(rankwise.latency, "compare_speed", lambda *_: pytest.fail("nothing to compare"))
    monkeypatch.setattr(rankwise.latency, "median_latency", lambda *_: 2e-3)
    dense = {"layer": RankChoice("dense", None, None, 0, 0.0, 0.0)}
    outcome, comparison, warnings = meet_latency_goal(Goal("latency_reduction", 0.3), lambda goal: (dense, False, {}, []),
                                                      lambda c: pytest.fail("nothing to build"), None, None)
    assert (comparison.seconds_before, comparison.seconds_after) == (2e-3, 2e-3) and outcome[1] is False
    assert len(warnings) == 1 and "every layer was kept dense" in warnings[0]


def test_zero_goal_keeps_the_outputs(stand_in_clock):
    model, batches = tiny("cnn")
    net, info = rw.compress_network_using_projection(model, batches, latency_reduction_goal=0.0,
                                                     latency_input=batches[0], verbosity="off")
    torch.testing.assert_close(net(batches[0]), model(batches[0]), rtol=1e-4, atol=1e-4)
    assert info.goal_reached


def test_without_latency_input_the_error_names_it():
    model, batches = tiny()
    snapshot = state_of(model)
    with pytest.raises(ValueError, match="latency_reduction_goal: .*needs latency_input="):
        rw.compress_network_using_projection(model, batches, latency_reduction_goal=0.3, verbosity="off")
    assert_unchanged(model, snapshot)


@pytest.mark.parametrize("other", ["learnables_reduction_goal", "flops_reduction_goal", "explained_variance_goal"])
def test_latency_goal_is_exclusive_with_the_other_goals(other):
    model, batches = tiny()
    with pytest.raises(ValueError, match="are exclusive"):
        rw.compress_network_using_projection(model, batches, latency_reduction_goal=0.3, latency_input=batches[0],
                                             verbosity="off", **{other: 0.5})


@pytest.mark.filterwarnings("ignore:latency_reduction_goal=0.2 was not reached")  # depends on the machine
def test_real_clock_and_the_record_survives_save(tmp_path):
    model, batches = tiny("mlp")
    net, info = rw.compress_network_using_projection(model, batches, latency_reduction_goal=0.2,
                                                     latency_input=batches[0], criterion="variance",
                                                     allocation="global", verbosity="off")
    assert info.latency_before > 0 and info.latency_after > 0
    assert info.goal_reached == (info.latency_reduction >= 0.2)
    rw.save(net, tmp_path / "net.safetensors", info=info)
    stored = rw.io.projection_info(rw.io.read_spec(tmp_path / "net.safetensors"))
    assert (stored.goal, stored.latency_before, stored.latency_after) == (info.goal, info.latency_before,
                                                                         info.latency_after)
