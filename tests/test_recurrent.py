"""Projected LSTM and GRU layers: exactness of both execution paths for every configuration,
statistics of stacked and bidirectional layers, ranks in the global allocation, spec, errors."""

import json

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import rankwise as rw
from rankwise.layers.recurrent import factored_is_faster
from rankwise.learnables import recurrent_learnables
from rankwise.rnn import cell_input_sizes, cell_names
from conftest import assert_goal_met_by_the_built_modules

PATHS = ("dense", "factored")
WRAPPERS = {nn.LSTM: rw.ProjectedLSTM, nn.GRU: rw.ProjectedGRU}
HIDDEN = 7

# name -> (dense type, keyword arguments); 5 input features, 7 hidden units
CONFIGS = {
    "lstm": (nn.LSTM, {}),
    "lstm-batch-first": (nn.LSTM, {"batch_first": True}),
    "lstm-2-layers-bidirectional": (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    "lstm-3-layers-dropout-batch-first": (nn.LSTM, {"num_layers": 3, "dropout": 0.3, "batch_first": True}),
    "lstm-no-bias-bidirectional": (nn.LSTM, {"bias": False, "bidirectional": True}),
    "gru": (nn.GRU, {}),
    "gru-batch-first-bidirectional": (nn.GRU, {"batch_first": True, "bidirectional": True}),
    "gru-2-layers-dropout": (nn.GRU, {"num_layers": 2, "dropout": 0.5}),
    "gru-no-bias-2-layers": (nn.GRU, {"bias": False, "num_layers": 2}),
}


def orthonormal(dim, seed):
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q


def dense_layer(name, seed=0):
    torch.manual_seed(seed)
    dense_type, kwargs = CONFIGS[name]
    return dense_type(5, HIDDEN, **kwargs).eval()


def project(layer, rank_in=None, rank_out=None, seed=0, **kwargs):
    """Both sides of every cell projected on random bases (full rank unless ranks are given),
    with random means folded into the biases (none without biases)."""
    cells, sizes = cell_names(layer.num_layers, layer.bidirectional), cell_input_sizes(layer)
    generator = torch.Generator().manual_seed(seed + 7)

    def mean(dim):
        return torch.randn(dim, generator=generator, dtype=torch.float64) if layer.bias else None

    return WRAPPERS[type(layer)].from_dense(
        layer,
        input_basis={c: orthonormal(d, seed + i)[:, :rank_in or d] for i, (c, d) in enumerate(zip(cells, sizes))},
        input_mean={c: mean(d) for c, d in zip(cells, sizes)},
        output_basis={c: orthonormal(HIDDEN, seed + 50 + i)[:, :rank_out or HIDDEN] for i, c in enumerate(cells)},
        output_mean={c: mean(HIDDEN) for c in cells}, **kwargs)


def inputs(layer, form, seed=1):
    """``(input, hx)`` of the given form: padded batch (3 sequences of 6 steps), packed
    sequences of lengths 4, 6, 2 (unsorted), or one unbatched sequence; hx random."""
    generator = torch.Generator().manual_seed(seed)
    cells = layer.num_layers * (2 if layer.bidirectional else 1)
    batch = 1 if form == "unbatched" else 3
    shape = (cells, HIDDEN) if form == "unbatched" else (cells, batch, HIDDEN)
    states = [torch.randn(*shape, generator=generator) for _ in range(2 if isinstance(layer, nn.LSTM) else 1)]
    hx = tuple(states) if len(states) == 2 else states[0]
    if form == "packed":
        return pack_sequence([torch.randn(n, 5, generator=generator) for n in (4, 6, 2)],
                             enforce_sorted=False), hx
    if form == "unbatched":
        return torch.randn(6, 5, generator=generator), hx
    return torch.randn(*((batch, 6) if layer.batch_first else (6, batch)), 5, generator=generator), hx


def flatten(result):
    """Every tensor of a recurrent layer's result, packed data included."""
    if isinstance(result, PackedSequence):
        return [result.data]
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for item in result for t in flatten(item)]


def assert_same_results(a, b, atol=1e-5):
    assert len(flatten(a)) == len(flatten(b))
    for x, y in zip(flatten(a), flatten(b)):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


# Exactness -----------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["padded", "packed", "unbatched"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_full_rank_projection_is_exact(name, path, form):
    layer = dense_layer(name)
    projected = project(layer, execution=path)
    x, hx = inputs(layer, form)
    assert_same_results(projected(x), layer(x))
    assert_same_results(projected(x, hx), layer(x, hx))
    if form == "packed":
        assert isinstance(projected(x)[0], PackedSequence)


@pytest.mark.parametrize("name", ["lstm-2-layers-bidirectional", "gru-batch-first-bidirectional"])
def test_cells_projecting_different_sides_are_exact(name):
    layer = dense_layer(name)
    wrapper = WRAPPERS[type(layer)]
    projected = wrapper.from_dense(layer, input_basis={"l0": orthonormal(5, 0)},
                                   output_basis={"l0_reverse": orthonormal(HIDDEN, 1)})
    assert projected.side == "both"
    assert projected.rank_in[:2] == (5, None) and projected.rank_out[:2] == (None, HIDDEN)
    x, hx = inputs(layer, "padded")
    for path in PATHS:
        projected.execution = path
        assert_same_results(projected(x, hx), layer(x, hx))


@pytest.mark.parametrize("name", ["lstm-3-layers-dropout-batch-first", "gru-2-layers-dropout"])
@pytest.mark.parametrize("path", PATHS)
def test_dropout_acts_between_layers_in_training(name, path):
    layer = dense_layer(name).train()
    layer.dropout = 1.0  # every input of the inner layers is zero: deterministic
    projected = project(layer, execution=path).train()
    x, _ = inputs(layer, "padded")
    assert_same_results(projected(x), layer(x))
    layer.dropout = projected.dropout = 0.4
    torch.manual_seed(0)
    first = flatten(projected(x))[0]
    assert not torch.equal(first, flatten(projected(x))[0])  # random, as in torch
    projected.eval()
    assert torch.equal(flatten(projected(x))[0], flatten(projected(x))[0])


@pytest.mark.parametrize("name", ["lstm-2-layers-bidirectional", "gru-no-bias-2-layers"])
def test_paths_agree_at_reduced_rank_with_gradients(name):
    layer = dense_layer(name)
    projected = project(layer, rank_in=3, rank_out=4)
    x, hx = inputs(layer, "packed")
    results, grads = [], []
    for path in PATHS:
        projected.execution = path
        projected.zero_grad()
        result = projected(x, hx)
        sum(t.square().sum() for t in flatten(result)).backward()
        results.append(result)
        grads.append([p.grad.clone() for p in projected.parameters()])
    assert_same_results(*results)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert_same_results(projected.to_dense()(x, hx), results[0])


def test_mean_is_folded_exactly_at_reduced_rank():
    """Inputs in an affine 2-dim subspace: a rank-2 input projection with their mean is exact."""
    torch.manual_seed(0)
    layer = nn.LSTM(6, HIDDEN).eval()
    basis, mean = orthonormal(6, 3)[:, :2], torch.randn(6, dtype=torch.float64)
    x = (mean + torch.randn(5, 4, 2, dtype=torch.float64) @ basis.T).float()
    projected = rw.ProjectedLSTM.from_dense(layer, input_basis=basis, input_mean=mean)
    for path in PATHS:
        projected.execution = path
        assert_same_results(projected(x), layer(x))


@pytest.mark.parametrize("rank_in, rank_out", [(3, None), (None, 2), (4, 5)])
def test_learnables_formula_matches_the_modules(rank_in, rank_out):
    layer = nn.GRU(5, HIDDEN, num_layers=2, bidirectional=True)
    cells, sizes = cell_names(2, True), cell_input_sizes(layer)
    projected = rw.ProjectedGRU.from_dense(
        layer, input_basis={c: orthonormal(d, 0)[:, :rank_in] for c, d in zip(cells, sizes)} if rank_in else None,
        output_basis={c: orthonormal(HIDDEN, 1)[:, :rank_out] for c in cells} if rank_out else None)
    expected = sum(recurrent_learnables(d, HIDDEN, 3, True, rank_in, rank_out) for d in sizes)
    assert rw.count_learnables(projected) == expected
    assert rw.count_learnables(layer) == sum(recurrent_learnables(d, HIDDEN, 3, True) for d in sizes)


def test_keeps_dtype_and_trainability_and_unpack_keeps_the_wrapper():
    layer = nn.LSTM(5, HIDDEN).double().requires_grad_(False)
    projected = rw.ProjectedLSTM.from_dense(layer, output_basis=orthonormal(HIDDEN, 0)[:, :3])
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in projected.parameters())
    assert projected.unpack() is projected
    assert rw.unpack_projected_layers(nn.Sequential(projected))[0] is not projected  # a copy
    assert isinstance(projected.to_dense(), nn.LSTM)
    assert "rank_out=3" in repr(projected) and "execution='auto'" in repr(projected)


# Execution path --------------------------------------------------------------------------------

def test_auto_execution_follows_the_measured_rule():
    small = rw.ProjectedLSTM.from_dense(nn.LSTM(5, 16), output_basis=orthonormal(16, 0)[:, :4])
    large = rw.ProjectedLSTM.from_dense(nn.LSTM(5, 512), output_basis=orthonormal(512, 0)[:, :16])
    cpu = torch.device("cpu")
    assert not small.uses_factored(1, cpu)
    assert large.uses_factored(1, cpu)
    assert not large.uses_factored(1, torch.device("cuda"))  # not calibrated there: dense
    assert factored_is_faster("gru", 64, 512, large._savings(), 1)
    large.execution = "dense"
    assert not large.uses_factored(1, cpu)
    with pytest.raises(ValueError, match="execution: expected one of 'auto', 'dense', 'factored'"):
        large.execution = "fast"


# Statistics -------------------------------------------------------------------------------------

class Tagger(nn.Module):
    """A 2-layer bidirectional LSTM (batch first) with a linear head on every time step."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(5, HIDDEN, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * HIDDEN, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out.data if isinstance(out, PackedSequence) else out)


def layer_outputs_directly(rnn, x):
    """The output rows of each stacked layer, by single-layer LSTMs holding copied weights."""
    rows, sequence = [], x
    for layer in range(rnn.num_layers):
        single = nn.LSTM(sequence.shape[-1], HIDDEN, bidirectional=True, batch_first=True)
        for cell, suffix in (("l0", f"l{layer}"), ("l0_reverse", f"l{layer}_reverse")):
            for weight in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(single, f"{weight}_{cell}").data.copy_(getattr(rnn, f"{weight}_{suffix}"))
        with torch.no_grad():
            sequence, _ = single(sequence)
        rows.append(sequence.reshape(-1, 2 * HIDDEN).double())
    return rows


def assert_moments(moments, rows):
    assert int(moments.count) == rows.shape[0]
    torch.testing.assert_close(moments.mean, rows.mean(0))
    torch.testing.assert_close(moments.covariance, torch.cov(rows.T, correction=0), atol=1e-6, rtol=1e-5)


def test_statistics_of_stacked_bidirectional_layers_match_a_direct_computation():
    torch.manual_seed(0)
    model, batches = Tagger().eval(), [torch.randn(4, 6, 5) for _ in range(3)]
    npca = rw.NeuronPCA(model, batches, verbosity="off")
    stats = npca.statistics("rnn")
    x = torch.cat(batches)
    inner, last = layer_outputs_directly(model.rnn, x)
    assert_moments(stats.input, x.reshape(-1, 5).double())
    assert_moments(stats.moments("input", "l1"), inner)
    assert_moments(stats.moments("input", "l1_reverse"), inner)
    assert_moments(stats.moments("output", "l0_reverse"), inner[:, HIDDEN:])
    assert_moments(stats.moments("output", "l1"), last[:, :HIDDEN])
    torch.testing.assert_close(stats.weight_gram("output", "l1_reverse"),
                               (model.rnn.weight_hh_l1_reverse.T @ model.rnn.weight_hh_l1_reverse).double())
    assert stats.cell_input_size("l1") == 2 * HIDDEN and stats.width == 2 * HIDDEN


def test_packed_calibration_sees_no_padding():
    torch.manual_seed(0)
    model = Tagger().eval()
    sequences = [torch.randn(n, 5) for n in (3, 7, 5)]
    npca = rw.NeuronPCA(model, [pack_sequence(sequences, enforce_sorted=False)], verbosity="off")
    stats = npca.statistics("rnn")
    assert int(stats.input.count) == 15
    assert_moments(stats.input, torch.cat(sequences).double())
    one_by_one = rw.NeuronPCA(model, [s.unsqueeze(0) for s in sequences], verbosity="off")
    for mine, theirs in zip(stats.outputs, one_by_one.statistics("rnn").outputs):
        torch.testing.assert_close(mine.covariance, theirs.covariance, atol=1e-6, rtol=1e-5)


def test_statistics_save_load_merge_and_spectra(tmp_path):
    torch.manual_seed(0)
    model, batches = Tagger().eval(), [torch.randn(4, 6, 5) for _ in range(4)]
    whole = rw.NeuronPCA(model, batches, verbosity="off")
    merged = rw.NeuronPCA(model, batches[:1], verbosity="off").merge(rw.NeuronPCA(model, batches[1:], verbosity="off"))
    whole.save(tmp_path / "stats.pt")
    loaded = rw.NeuronPCA.load(tmp_path / "stats.pt")
    for other in (merged, loaded):
        for cell in ("l0", "l1_reverse"):
            for side in ("input", "output"):
                torch.testing.assert_close(other.spectrum("rnn", side, cell).eigenvalues,
                                           whole.spectrum("rnn", side, cell).eigenvalues)
    spectrum = whole.spectrum("rnn", "output", "l1")
    assert torch.all(spectrum.eigenvalues[:-1] >= spectrum.eigenvalues[1:])
    with pytest.raises(ValueError, match="cell: expected one of 'l0', 'l0_reverse', 'l1', 'l1_reverse'"):
        whole.spectrum("rnn", "output")
    with pytest.raises(ValueError, match="cell: layer 'head' is not recurrent"):
        whole.spectrum("head", "output", "l0")


def test_layer_without_biases_is_analysed_uncentred():
    torch.manual_seed(0)
    model = nn.Sequential(nn.GRU(5, HIDDEN, bias=False))
    npca = rw.NeuronPCA(model, [torch.randn(6, 4, 5) + 3.0], verbosity="off")
    spectrum = npca.spectrum("0", "input")
    assert torch.equal(spectrum.mean, torch.zeros(5, dtype=torch.float64))
    assert spectrum.eigenvalues[0] > 9 * 4  # the offset of 3 in 5 features dominates
    net, _ = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.3, verbosity="off")
    assert rw.count_learnables(net) < rw.count_learnables(model)


# Compression -------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """An LSTM or GRU reading sequences, a linear head on its last hidden state."""

    def __init__(self, rnn, head):
        super().__init__()
        self.rnn, self.head = rnn, head

    def forward(self, x):
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h[-1])


@pytest.mark.parametrize("dense_type, kwargs", [(nn.LSTM, {}), (nn.GRU, {"num_layers": 2, "bidirectional": True})])
@pytest.mark.parametrize("goal", [0.3, 0.6, 0.9])
def test_learnables_reduction_goal_with_recurrent_layers(dense_type, kwargs, goal):
    torch.manual_seed(0)
    model = Classifier(dense_type(6, 16, batch_first=True, **kwargs), nn.Linear(16, 20)).eval()
    data = [torch.randn(8, 10, 6) for _ in range(4)]
    npca = rw.NeuronPCA(model, data, verbosity="off")
    _, high = npca.learnables_reduction_range
    net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=goal, verbosity="off")
    assert_goal_met_by_the_built_modules(net, info, goal, high)
    if "bidirectional" in kwargs and info.layers["rnn"].side != "dense":
        assert len(info.layers["rnn"].rank_out) == 4


def test_explained_variance_goal_and_layer_names():
    torch.manual_seed(0)
    model = Classifier(nn.LSTM(6, 16, batch_first=True), nn.Linear(16, 20)).eval()
    data = [torch.randn(8, 10, 6) for _ in range(4)]
    net, info = rw.compress_network_using_projection(model, data, explained_variance_goal=0.9,
                                                     layer_names=["rnn"], verbosity="off")
    assert list(info.layers) == ["rnn"] and info.layers["rnn"].explained_variance >= 0.9
    assert isinstance(net.rnn, rw.ProjectedLSTM) and type(net.head) is nn.Linear
    unpacked, _ = rw.compress_network_using_projection(model, data, explained_variance_goal=0.9,
                                                       unpack=True, verbosity="off")
    assert isinstance(unpacked.rnn, rw.ProjectedLSTM)  # no plain torch equivalent: kept
    x = data[0]
    torch.testing.assert_close(unpacked(x), net(x))


def test_global_allocation_weighs_recurrent_and_linear_layers_alike():
    """Whichever layer can give the learnables at no loss of variance is compressed first."""
    torch.manual_seed(0)
    low_rank_head = nn.Linear(16, 60)
    with torch.no_grad():
        low_rank_head.weight.copy_(torch.randn(60, 2) @ torch.randn(2, 16))
    model = Classifier(nn.LSTM(8, 16, batch_first=True), low_rank_head).eval()
    npca = rw.NeuronPCA(model, [torch.randn(16, 12, 8) for _ in range(4)], verbosity="off", regularization=0.0)
    _, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.25, verbosity="off")
    assert info.layers["rnn"].side == "dense" and info.layers["head"].side == "output"

    basis = torch.randn(32, 2)  # inputs in a 2-dim subspace: the LSTM's input side is free
    model = Classifier(nn.LSTM(32, 16, batch_first=True), nn.Linear(16, 16)).eval()
    npca = rw.NeuronPCA(model, [torch.randn(16, 12, 2) @ basis.T for _ in range(4)], verbosity="off",
                        regularization=0.0)
    _, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.3, verbosity="off")
    assert info.layers["head"].side == "dense"
    assert info.layers["rnn"].side == "input" and info.layers["rnn"].rank_in == 2
    assert info.layers["rnn"].explained_variance > 1 - 1e-6


def test_verbosity_prints_recurrent_steps(capsys):
    torch.manual_seed(0)
    model = Classifier(nn.GRU(6, 16, num_layers=2, batch_first=True), nn.Linear(16, 20)).eval()
    npca = rw.NeuronPCA(model, [torch.randn(8, 10, 6) for _ in range(4)], verbosity="off")
    rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.5, verbosity="iterations")
    printed = capsys.readouterr().out
    assert "allocation step 1:" in printed and "rnn: " in printed and "gru" in printed


# Spec ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lstm", "lstm-2-layers-bidirectional", "gru-no-bias-2-layers"])
def test_spec_rebuilds_the_same_structure(name):
    layer = dense_layer(name)
    cells = cell_names(layer.num_layers, layer.bidirectional)
    projected = WRAPPERS[type(layer)].from_dense(
        layer, input_basis={cells[0]: orthonormal(5, 0)[:, :2]},
        output_basis={c: orthonormal(HIDDEN, i)[:, :3 + i] for i, c in enumerate(cells[1:] or cells)},
        execution="factored")
    spec = json.loads(json.dumps(projected.spec()))
    rebuilt = type(projected).from_spec(dense_layer(name, seed=1), spec)
    rebuilt.load_state_dict(projected.state_dict())
    assert repr(rebuilt) == repr(projected) and rebuilt.spec() == spec
    x, hx = inputs(layer, "padded")
    assert_same_results(rebuilt(x, hx), projected(x, hx), atol=0)
    with pytest.raises(ValueError, match="spec: describes a 'ProjectedGRU'"):
        rw.ProjectedLSTM.from_spec(nn.LSTM(5, HIDDEN), {**spec, "type": "ProjectedGRU"})


# Bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_input, message", [
    (lambda: (torch.randn(6, 3, 4),), "input: expected 5 features in its last dimension"),
    (lambda: (torch.randn(2, 6, 3, 5),), "expected a 3-D batch of sequences.*got a 4-D tensor"),
    (lambda: (pack_sequence([torch.randn(3, 4)]),), "expected 5 features"),
    (lambda: (torch.randn(6, 3, 5), torch.randn(1, 3, HIDDEN)), "hx: expected a pair"),
    (lambda: (torch.randn(6, 3, 5), (torch.randn(1, 2, HIDDEN),) * 2), r"hx: expected initial states of shape \(1, 3, 7\)"),
    (lambda: (torch.randn(6, 5), (torch.randn(1, 1, HIDDEN),) * 2), r"shape \(1, 7\) \(layers x directions, hidden_size\)"),
])
def test_bad_inputs_raise_clearly(make_input, message):
    projected = project(nn.LSTM(5, HIDDEN), rank_out=3)
    with pytest.raises(ValueError, match=message):
        projected(*make_input())


@pytest.mark.parametrize("kwargs, message", [
    ({}, "input_basis, output_basis or both"),
    ({"output_basis": torch.eye(HIDDEN)}, "output_basis: the layer has 2 cells .*give a dict"),
    ({"output_basis": {"l1": torch.eye(HIDDEN)}}, "'l1' is not a cell of the layer"),
    ({"output_basis": {"l0": torch.eye(6)}}, r"output_basis\['l0'\]: expected shape \(7, rank\)"),
])
def test_from_dense_rejects_bad_bases(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rw.ProjectedLSTM.from_dense(nn.LSTM(5, HIDDEN, bidirectional=True), **kwargs)


def test_from_dense_rejects_other_layers_and_means_without_biases():
    with pytest.raises(ValueError, match="expected an nn.GRU"):
        rw.ProjectedGRU.from_dense(nn.LSTM(5, HIDDEN), output_basis=torch.eye(HIDDEN))
    with pytest.raises(ValueError, match="input_mean: the layer has no biases"):
        rw.ProjectedGRU.from_dense(nn.GRU(5, HIDDEN, bias=False), input_basis=torch.eye(5)[:, :2],
                                   input_mean=torch.ones(5))


def test_lstm_with_proj_size_is_not_projectable():
    model = nn.Sequential(nn.LSTM(5, HIDDEN, proj_size=3))
    with pytest.raises(ValueError, match="'0' cannot be projected: it is an LSTM with proj_size=3"):
        rw.NeuronPCA(model, [torch.randn(4, 2, 5)], layer_names=["0"], verbosity="off")
