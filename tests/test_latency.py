"""Latency and FLOPs (rankwise.latency) and latency-aware projection (latency_input).

No assertion here depends on how fast anything runs: decisions are checked with scripted
latencies (``rankwise.latency.median_latency`` patched), real timings only for identities
that hold whatever the times are.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import rankwise as rw
import rankwise.latency
from conftest import (assert_goal_met_by_the_built_modules, assert_unchanged, make_batches, state_of,
                      tiny_cnn, tiny_mlp)


# FLOPs ------------------------------------------------------------------------------------------

def test_count_flops_of_a_linear_layer_is_two_per_multiply_add():
    assert rw.count_flops(nn.Linear(20, 30), torch.randn(4, 20)) == 2 * 4 * 20 * 30


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0)])
def test_count_flops_of_a_convolution_matches_the_formula(stride, padding):
    conv, x = nn.Conv2d(3, 8, 3, stride=stride, padding=padding), torch.randn(2, 3, 9, 9)
    out = (9 + 2 * padding - 3) // stride + 1
    assert rw.count_flops(conv, x) == 2 * 2 * 8 * out * out * 3 * 3 * 3


def test_count_flops_adds_the_layers_and_takes_positional_arguments():
    model = tiny_mlp()
    assert rw.count_flops(model, torch.randn(4, 12)) == 2 * 4 * (12 * 24 + 24 * 16 + 16 * 5)
    assert rw.count_flops(nn.Linear(20, 30), (torch.randn(4, 20),)) == 4800
    assert rw.count_flops(model.train(), {"input": torch.randn(4, 12)}) == 2 * 4 * (12 * 24 + 24 * 16 + 16 * 5)
    assert model.training


def lstm_flops(gates, hidden, widths, steps, directions=1, projection=0):
    """The fused kernel's FLOPs written out: 2 per multiply-add, per step and cell."""
    state = projection or hidden
    return 2 * steps * directions * sum(gates * hidden * (width + state) + hidden * projection
                                        for width in widths)


@pytest.mark.parametrize("layer, widths, directions, projection", [
    (nn.LSTM(5, 7), [5], 1, 0),
    (nn.LSTM(5, 7, num_layers=2, bidirectional=True), [5, 14], 2, 0),
    (nn.LSTM(5, 7, num_layers=2, proj_size=3), [5, 3], 1, 3),
    (nn.GRU(5, 7, num_layers=2), [5, 7], 1, 0),
    (nn.RNN(5, 7), [5], 1, 0)])
def test_count_flops_counts_the_fused_recurrent_kernels(layer, widths, directions, projection):
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[type(layer)]
    expected = lstm_flops(gates, 7, widths, 4 * 3, directions, projection)
    assert rw.count_flops(layer, torch.randn(4, 3, 5)) == expected          # T=4, N=3
    assert rw.count_flops(layer, torch.randn(4, 5)) == expected // 3        # unbatched
    packed = pack_sequence([torch.randn(4, 5), torch.randn(2, 5)])
    assert rw.count_flops(layer, packed) == lstm_flops(gates, 7, widths, 6, directions, projection)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(6, 8, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


def test_a_projected_lstm_counts_the_fused_kernel_on_its_dense_path_and_its_products_otherwise():
    torch.manual_seed(0)
    model, data = Recurrent(), [torch.randn(4, 5, 6) for _ in range(6)]
    net, _ = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.3, verbosity="off")
    r_in, r_out = net.rnn.rank_in or 0, net.rnn.rank_out or 0
    assert r_in or r_out
    x = torch.randn(4, 5, 6)
    net.rnn.execution = "dense"      # rebuilds W_ih Q Q^T and W_hh Q Q^T, then the fused kernel
    rebuild = 2 * 4 * 8 * (r_in * 6 + r_out * 8)
    assert rw.count_flops(net, x) == rw.count_flops(model, x) + rebuild
    packed = pack_sequence(list(x))  # torch's CPU kernel on packed input: products the counter sees
    assert rw.count_flops(net, packed) == rw.count_flops(model, packed) + rebuild
    net.rnn.execution = "factored"
    assert 0 < rw.count_flops(net, x) < rw.count_flops(model, x)


# Latency ----------------------------------------------------------------------------------------

class Counting(nn.Module):
    """Counts its calls and records the mode and grad state it ran in."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        self.calls, self.modes = 0, set()

    def forward(self, x, scale=1.0):
        self.calls += 1
        self.modes.add((self.training, self.inner[1].training, torch.is_inference_mode_enabled()))
        return self.inner(x) * scale


def test_median_latency_runs_warmup_and_repeats_in_eval_and_inference_mode_and_restores_modes():
    module = Counting().train()
    module.inner[0].eval()   # mixed modes come back as they were
    seconds = rw.median_latency(module, (torch.randn(2, 4), 2.0), repeats=5, warmup=2)
    assert isinstance(seconds, float) and seconds > 0
    assert module.calls == 7 and module.modes == {(False, False, True)}
    assert module.training and not module.inner[0].training and module.inner[1].training
    rw.median_latency(module, torch.randn(2, 4), repeats=1, warmup=0)
    assert module.calls == 8


@pytest.mark.parametrize("kwargs, message", [({"repeats": 0}, "repeats: expected an integer >= 1"),
                                             ({"warmup": -1}, "warmup: expected an integer >= 0"),
                                             ({"repeats": 2.5}, "repeats")])
def test_median_latency_rejects_bad_counts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rw.median_latency(nn.Linear(2, 2), torch.randn(1, 2), **kwargs)


def test_speed_comparison_properties_are_the_ratios():
    comparison = rw.SpeedComparison(flops_before=100, flops_after=25, seconds_before=2.0, seconds_after=1.6)
    assert comparison.flop_reduction == 4.0
    assert comparison.realised_speedup == pytest.approx(1.25)
    assert comparison.speedup_efficiency == pytest.approx(1.25 / 4.0)
    text = str(comparison)
    assert "\n" not in text and "4.00x fewer" in text and "1.25x faster" in text and "0.31" in text


def test_compare_speed_measures_both_networks(monkeypatch):
    torch.manual_seed(0)
    model, data = tiny_mlp().eval(), make_batches((32, 12))
    net, _ = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.5, verbosity="off")
    times = {id(model): 3.0, id(net): 2.0}
    monkeypatch.setattr(rankwise.latency, "latency_samples",
                        lambda module, x, repeats, warmup: [times[id(module)]] * repeats)
    comparison = rw.compare_speed(model, net, data[0], repeats=3)
    assert comparison.flops_before == rw.count_flops(model, data[0]) == 2 * 32 * (12 * 24 + 24 * 16 + 16 * 5)
    assert comparison.flops_after == rw.count_flops(net, data[0]) < comparison.flops_before
    assert (comparison.seconds_before, comparison.seconds_after) == (3.0, 2.0)
    assert comparison.flop_reduction == comparison.flops_before / comparison.flops_after
    assert comparison.speedup_efficiency == pytest.approx(1.5 / comparison.flop_reduction)
    assert comparison.device == "cpu" and comparison.stable and comparison.rounds == 2
    assert comparison.spread_before == comparison.spread_after == 0.0


def scripted_samples(monkeypatch, rounds_of):
    """Patch ``latency_samples``: the n-th call on a module returns ``rounds_of[module][n]``
    (the warm-up round first), as many times as the repeats asked."""
    calls = {}

    def fake(module, example_input, repeats, warmup):
        index = calls[id(module)] = calls.get(id(module), -1) + 1
        times = rounds_of[id(module)][index]
        return list(times) if isinstance(times, list) else [times] * repeats

    monkeypatch.setattr(rankwise.latency, "latency_samples", fake)


def test_compare_speed_times_rounds_until_the_medians_settle(monkeypatch):
    model, other = tiny_mlp(), tiny_mlp()
    # warm-up round, then medians 2.0, 1.0, 1.02 (within 5%: settled at round 3)
    scripted_samples(monkeypatch, {id(model): [50.0, 2.0, 1.0, 1.02], id(other): [9.0, 0.5, 0.5, 0.51]})
    comparison = rw.compare_speed(model, other, torch.randn(8, 12), repeats=4)
    assert comparison.stable and comparison.rounds == 3
    assert (comparison.seconds_before, comparison.seconds_after) == (1.02, 0.51)
    assert "UNSTABLE" not in str(comparison) and "2.00x faster" in str(comparison)


def test_compare_speed_that_never_settles_says_the_ratio_is_unreliable(monkeypatch):
    model, other = tiny_mlp(), tiny_mlp()
    scripted_samples(monkeypatch, {id(model): [5.0] + [1.0, 2.0] * 3, id(other): [5.0] + [1.0] * 6})
    with pytest.warns(rankwise.latency.UnstableTimingWarning, match="unreliable"):
        comparison = rw.compare_speed(model, other, torch.randn(8, 12), repeats=2, max_rounds=6)
    assert not comparison.stable and comparison.rounds == 6
    assert "UNSTABLE timings (not settled after 6 rounds)" in str(comparison)


def test_compare_speed_with_a_wide_spread_is_not_stable(monkeypatch):
    model, other = tiny_mlp(), tiny_mlp()
    wide = [1.0, 1.0, 3.0, 3.0]                      # the same median every round, IQR 200% of it
    scripted_samples(monkeypatch, {id(model): [wide] * 4, id(other): [1.0] * 4})
    with pytest.warns(rankwise.latency.UnstableTimingWarning):
        comparison = rw.compare_speed(model, other, torch.randn(8, 12), repeats=4, max_rounds=3)
    assert not comparison.stable and comparison.spread_before == pytest.approx(2.0 / 2.0)
    assert "spread 100% / 0%" in str(comparison)


@pytest.mark.parametrize("kwargs, message", [({"max_rounds": 1}, "max_rounds: expected an integer >= 2"),
                                             ({"repeats": 0}, "repeats: expected an integer >= 1")])
def test_compare_speed_rejects_bad_counts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rw.compare_speed(nn.Linear(2, 2), nn.Linear(2, 2), torch.randn(1, 2), **kwargs)


def test_ratios_below_one_are_written_as_more_and_slower():
    text = str(rw.SpeedComparison(flops_before=300, flops_after=400, seconds_before=1.0, seconds_after=1.08))
    assert "1.33x more FLOPs" in text and "1.08x slower" in text
    assert "fewer" not in text and "faster" not in text


def test_compare_speed_with_real_timings_is_consistent():
    model = tiny_mlp()
    comparison = rw.compare_speed(model, model, torch.randn(8, 12), repeats=3)
    assert comparison.flop_reduction == 1.0 and comparison.seconds_before > 0 and comparison.seconds_after > 0
    assert comparison.realised_speedup == comparison.seconds_before / comparison.seconds_after


# Latency-aware projection -----------------------------------------------------------------------

def is_projected(module):
    return isinstance(module, rw.ProjectedLayer | nn.Sequential)


def scripted_latency(slow_widths, log=None):
    """A fake median_latency: dense layers take 1 s, projected ones 0.5 s, or 2 s when their
    input has a width in ``slow_widths`` (the tiny MLP's layers have input widths 12, 24, 16)."""
    def fake(module, example_input, **kwargs):
        width = example_input[0].shape[-1]
        if log is not None:
            log.append((width, is_projected(module)))
        if not is_projected(module):
            return 1.0
        return 2.0 if width in slow_widths else 0.5
    return fake


@pytest.fixture
def mlp_and_data():
    torch.manual_seed(0)
    return tiny_mlp().eval(), make_batches((32, 12))


def test_a_layer_not_faster_is_kept_dense_and_the_goal_met_by_the_others(monkeypatch, mlp_and_data):
    model, data = mlp_and_data
    npca = rw.NeuronPCA(model, data, verbosity="off")
    _, plain = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.25, verbosity="off")
    assert plain.layers["2"].side != "dense"          # without timing, layer 2 is projected
    log = []
    monkeypatch.setattr(rankwise.latency, "median_latency", scripted_latency({24}, log))
    net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.25,
                                                     verbosity="off", latency_input=data[0])
    assert info.kept_dense_for_latency == ["2"] and info.latency_device == "cpu"
    assert type(net[2]) is nn.Linear and info.layers["2"].side == "dense"
    assert (info.layers["2"].dense_seconds, info.layers["2"].projected_seconds) == (1.0, 2.0)
    high_without_2 = rw.NeuronPCA(model, data, layer_names=["0", "4"], verbosity="off").learnables_reduction_range[1]
    assert 0.25 < high_without_2
    assert_goal_met_by_the_built_modules(net, info, 0.25, high_without_2)
    for name in info.layer_names:
        assert (info.layers[name].dense_seconds, info.layers[name].projected_seconds) == (1.0, 0.5)
    # layer 2 was timed once (then excluded); every layer timed dense as often as projected
    assert log.count((24, True)) == 1
    assert all(log.count((w, True)) == log.count((w, False)) for w in (12, 24, 16))
    table = info.table()
    assert "kept dense: not faster on cpu: 2" in table and "(slower: kept dense)" in table


def test_goal_not_reachable_by_the_faster_layers_is_reported(monkeypatch, mlp_and_data):
    model, data = mlp_and_data
    monkeypatch.setattr(rankwise.latency, "median_latency", scripted_latency({24}))
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.6,
                                                     verbosity="off", latency_input=data[0])
    assert not info.goal_reached and info.kept_dense_for_latency == ["2"]
    assert type(net[2]) is nn.Linear and "not reachable by the layers that get faster" in info.table()
    # the maximum named is that of the layers left once layer 2 was kept dense; they keep their
    # first choices (at the goal over all three layers), not their smallest forms
    left = rw.NeuronPCA(model, data, layer_names=["0", "4"], verbosity="off").learnables_reduction_range[1]
    assert any(f"({left:.2%} of the network's learnables" in message and "keep the forms first chosen" in message
               for message in info.warnings)
    _, untimed = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.6, verbosity="off")
    for name in ("0", "4"):
        assert (info.layers[name].rank_in, info.layers[name].rank_out) == (untimed.layers[name].rank_in,
                                                                           untimed.layers[name].rank_out)


def test_measurements_are_saved_with_the_info(monkeypatch, mlp_and_data, tmp_path):
    from rankwise import io as rankwise_io

    model, data = mlp_and_data
    monkeypatch.setattr(rankwise.latency, "median_latency", scripted_latency({24}))
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.25,
                                                     verbosity="off", latency_input=data[0])
    rw.save(net, tmp_path / "net.safetensors", info=info)
    loaded = rankwise_io.projection_info(rankwise_io.read_spec(tmp_path / "net.safetensors"))
    assert loaded == info and loaded.table() == info.table()


def test_explained_variance_goal_keeps_the_other_layers_choices(monkeypatch, mlp_and_data):
    model, data = mlp_and_data
    npca = rw.NeuronPCA(model, data, verbosity="off")
    _, plain = rw.compress_network_using_projection(model, npca, explained_variance_goal=0.8, verbosity="off")
    monkeypatch.setattr(rankwise.latency, "median_latency", scripted_latency({12}))
    net, info = rw.compress_network_using_projection(model, npca, explained_variance_goal=0.8,
                                                     verbosity="off", latency_input=data[0], unpack=True)
    assert info.kept_dense_for_latency == ["0"] and type(net[0]) is nn.Linear
    assert plain.layers["0"].side != "dense"
    for name in ("2", "4"):
        assert (info.layers[name].side, info.layers[name].rank_out) == (plain.layers[name].side,
                                                                       plain.layers[name].rank_out)


def test_when_every_layer_is_faster_the_model_is_the_one_without_timing(monkeypatch, mlp_and_data):
    model, data = mlp_and_data
    npca = rw.NeuronPCA(model, data, verbosity="off")
    plain_net, plain = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.5,
                                                            verbosity="off")
    default_net, default = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.5,
                                                                verbosity="off", latency_input=None)
    monkeypatch.setattr(rankwise.latency, "median_latency", scripted_latency(set()))
    timed_net, timed = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.5,
                                                            verbosity="off", latency_input=data[0])
    assert default == plain and default.kept_dense_for_latency == [] and default.latency_device is None
    assert "latency" not in plain.table()
    assert timed.kept_dense_for_latency == [] and "every projected layer is faster" in timed.table()
    for net in (default_net, timed_net):
        assert repr(net) == repr(plain_net)
        assert net.state_dict().keys() == plain_net.state_dict().keys()
        for key, value in plain_net.state_dict().items():
            torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0)
    assert [(p.side, p.rank_in, p.rank_out) for p in timed.layers.values()] == \
        [(p.side, p.rank_in, p.rank_out) for p in plain.layers.values()]


def test_real_timings_give_consistent_decisions(capsys):
    """Whatever the times: projected layers were faster, kept-dense ones were not."""
    torch.manual_seed(0)
    model, data = tiny_cnn().eval(), make_batches((32, 3, 8, 8))
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.5,
                                                     verbosity="steps", latency_input=data[0])
    assert "latency " in capsys.readouterr().out
    for name, p in info.layers.items():
        if name in info.kept_dense_for_latency:
            assert p.side == "dense" and p.projected_seconds >= p.dense_seconds
            assert not is_projected(net.get_submodule(name))
        elif p.side != "dense":
            assert p.projected_seconds < p.dense_seconds
            assert isinstance(net.get_submodule(name), rw.ProjectedLayer)


class RecurrentTagger(nn.Module):
    """An LSTM called with an explicit initial state, then a linear head."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(5, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        if isinstance(x, PackedSequence):
            out, _ = self.rnn(x)
            return self.head(out.data)
        state = (torch.zeros(1, x.shape[0], 16), torch.zeros(1, x.shape[0], 16))
        out, _ = self.rnn(x, state)
        return self.head(out)


@pytest.mark.parametrize("packed", [False, True])
def test_recurrent_layers_are_timed_on_their_recorded_arguments(monkeypatch, packed):
    torch.manual_seed(0)
    model = RecurrentTagger().eval()
    data = make_batches((8, 6, 5))
    if packed:
        data = [pack_sequence(list(x), enforce_sorted=False) for x in data]
    seen = []

    def fake(module, example_input, **kwargs):
        seen.append((type(module).__name__, tuple(type(a).__name__ for a in example_input)))
        return 0.5 if is_projected(module) else 1.0

    monkeypatch.setattr(rankwise.latency, "median_latency", fake)
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.3,
                                                     verbosity="off", latency_input=data[0])
    assert info.layers["rnn"].side != "dense" and isinstance(net.rnn, rw.ProjectedLSTM)
    rnn_args = ("PackedSequence",) if packed else ("Tensor", "tuple")
    assert ("LSTM", rnn_args) in seen and ("ProjectedLSTM", rnn_args) in seen
    with torch.no_grad():
        assert net(data[0]).shape == model(data[0]).shape


# Bad latency_input: a clear error, and the model is left as it was -----------------------------

class Branching(nn.Module):
    """Calls ``big`` only on batches of at least 16."""

    def __init__(self):
        super().__init__()
        self.small, self.big = nn.Linear(12, 12), nn.Linear(12, 12)

    def forward(self, x):
        return self.big(self.small(x)) if x.shape[0] >= 16 else self.small(x)


@pytest.mark.parametrize("factory, latency_input, message", [
    (tiny_mlp, torch.randn(32, 13), r"latency_input: the model's forward failed on it \(RuntimeError: .*\); "
                                    "pass a batch the model accepts"),
    (tiny_mlp, torch.randn(32, 12, device="meta"), "latency_input: it is on meta but the model is on cpu"),
    (tiny_mlp, "images", "latency_input: expected a tensor"),
    (Branching, torch.randn(4, 12), "latency_input: the model's forward on it does not call layer.*'big'"),
])
def test_bad_latency_input_raises_clearly_and_leaves_the_model(factory, latency_input, message):
    torch.manual_seed(0)
    model = factory().train()
    snapshot = state_of(model)
    with pytest.raises(ValueError, match=message):
        rw.compress_network_using_projection(model, make_batches((32, 12)), learnables_reduction_goal=0.5,
                                             verbosity="off", latency_input=latency_input)
    assert_unchanged(model, snapshot)
    assert model.training and not any(isinstance(m, rw.ProjectedLayer) for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
