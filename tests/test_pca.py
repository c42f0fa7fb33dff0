"""NeuronPCA: moments against a direct computation, shards, save/load, thin data, bad input."""

import math
import pathlib
import warnings

import pytest
import torch
from torch import nn

import rankwise as rw
from conftest import SequenceModel, assert_unchanged, make_batches, state_of, tiny_cnn, tiny_mlp


def captured_activations(model, data, layer):
    """Inputs and outputs of ``layer`` over ``data``, recorded directly."""
    seen = {"input": [], "output": []}

    def record(module, args, output):
        seen["input"].append(args[0])
        seen["output"].append(output)

    handle = layer.register_forward_hook(record)
    with torch.no_grad():
        for batch in data:
            model(batch)
    handle.remove()
    return seen


def as_channel_rows(t, channel_dim):
    return t.movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim]).double()


@pytest.mark.parametrize("factory, shape, name, channel_dim", [
    (tiny_mlp, (32, 12), "2", -1),
    (tiny_cnn, (32, 3, 8, 8), "2", 1),
    (SequenceModel, (8, 7, 6), "embed", -1),
    (SequenceModel, (8, 7, 6), "mix", 1),
])
def test_moments_match_a_direct_computation(factory, shape, name, channel_dim):
    torch.manual_seed(0)
    model, data = factory(), make_batches(shape)
    npca = rw.NeuronPCA(model, data, verbosity="off")
    seen = captured_activations(model, data, model.get_submodule(name))
    for side in ("input", "output"):
        rows = torch.cat([as_channel_rows(t, channel_dim) for t in seen[side]])
        moments = npca.statistics(name).moments(side)
        assert int(moments.count) == rows.shape[0]
        torch.testing.assert_close(moments.mean, rows.mean(0))
        torch.testing.assert_close(moments.power, rows.var(0, correction=0).mean())
        layer = model.get_submodule(name)
        if side == "input" and isinstance(layer, nn.Linear):
            # only the smaller side's Gram: the input's when d_in <= d_out (the output's derived)
            assert (moments.outer is None) == (layer.in_features > layer.out_features)
            if moments.outer is None:
                continue
        torch.testing.assert_close(moments.covariance, torch.cov(rows.T, correction=0),
                                   atol=1e-6, rtol=1e-5)


def test_layer_names_in_model_order_and_spectra(model_and_data):
    model, data = model_and_data
    npca = rw.NeuronPCA(model, data, verbosity="off")
    expected = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)]
    assert npca.layer_names == expected
    for name in npca.layer_names:
        linear = isinstance(model.get_submodule(name), nn.Linear)
        for side in ("output",) if linear else ("input", "output"):
            spectrum = npca.spectrum(name, side)
            assert torch.all(spectrum.eigenvalues[:-1] >= spectrum.eigenvalues[1:])
            vectors = spectrum.eigenvectors
            torch.testing.assert_close(vectors.T @ vectors, torch.eye(vectors.shape[1], dtype=torch.float64))


def test_moments_of_two_shards_add_up_to_the_whole():
    torch.manual_seed(0)
    model, data = tiny_cnn(), make_batches((32, 3, 8, 8), count=6)
    whole = rw.NeuronPCA(model, data, verbosity="off")
    merged = rw.NeuronPCA(model, data[:2], verbosity="off").merge(rw.NeuronPCA(model, data[2:], verbosity="off"))
    assert merged.num_batches == whole.num_batches == 6
    for name in whole.layer_names:
        for side in ("input", "output"):
            a, b = whole.statistics(name).moments(side), merged.statistics(name).moments(side)
            assert torch.equal(a.count, b.count)
            torch.testing.assert_close(a.sum, b.sum)
            torch.testing.assert_close(a.square_sum, b.square_sum)
            expect_outer = not (side == "input" and name == "5")  # Linear inputs: power only
            assert (a.outer is not None) == (b.outer is not None) == expect_outer
            if expect_outer:
                torch.testing.assert_close(a.outer, b.outer)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model, data = tiny_cnn(), make_batches((32, 3, 8, 8))
    npca = rw.NeuronPCA(model, data, verbosity="off")
    npca.save(tmp_path / "stats.pt")
    loaded = rw.NeuronPCA.load(tmp_path / "stats.pt")
    assert loaded.layer_names == npca.layer_names
    assert loaded.learnables_reduction_range == npca.learnables_reduction_range
    for name in npca.layer_names:
        assert torch.equal(loaded.spectrum(name).eigenvalues, npca.spectrum(name).eigenvalues)
    a, _ = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.5, verbosity="off")
    b, _ = rw.compress_network_using_projection(model, loaded, learnables_reduction_goal=0.5, verbosity="off")
    assert torch.equal(a(data[0]), b(data[0]))


def test_load_rejects_other_files(tmp_path):
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a NeuronPCA file"):
        rw.NeuronPCA.load(tmp_path / "other.pt")


def test_model_is_left_as_it_was_and_training_flag_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 3)).train()
    snapshot = state_of(model)
    npca = rw.NeuronPCA(model, make_batches((32, 12)), verbosity="off")
    assert model.training
    assert_unchanged(model, snapshot)
    assert not model[0]._forward_hooks
    # eval mode during calibration: the dropout did not act, so the moments are deterministic
    again = rw.NeuronPCA(model, make_batches((32, 12)), verbosity="off")
    assert torch.equal(npca.statistics("3").output.outer, again.statistics("3").output.outer)


def test_batch_forms_and_max_batches():
    torch.manual_seed(0)
    model, batches = tiny_mlp(), make_batches((32, 12), count=5)
    plain = rw.NeuronPCA(model, batches, verbosity="off")
    tuples = rw.NeuronPCA(model, [(b, torch.zeros(32)) for b in batches], verbosity="off")
    custom = rw.NeuronPCA(model, [{"features": b} for b in batches], verbosity="off",
                          forward_fn=lambda m, batch: m(batch["features"]))
    one_tensor = rw.NeuronPCA(model, torch.cat(batches), verbosity="off")
    generator = rw.NeuronPCA(model, (b for b in batches), verbosity="off", max_batches=2)
    for other in (tuples, custom, one_tensor):  # batch Grams run in float32: equal to ~1e-6
        torch.testing.assert_close(other.statistics("0").input.outer, plain.statistics("0").input.outer,
                                   rtol=1e-5, atol=1e-4)
    assert generator.num_batches == 2 and int(generator.statistics("0").input.count) == 64


def test_dict_batches_are_keyword_arguments():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, features):
            return self.fc(features)

    npca = rw.NeuronPCA(Keyword(), [{"features": torch.randn(8, 4)}], verbosity="off")
    assert int(npca.statistics("fc").input.count) == 8


def test_progress_bar_and_summary_follow_verbosity(capsys):
    model, data = tiny_mlp(), make_batches((32, 12), count=2)
    rw.NeuronPCA(model, data, verbosity="off")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    rw.NeuronPCA(model, data, verbosity="summary")
    captured = capsys.readouterr()
    assert "NeuronPCA: 3 layers, 2 batches" in captured.out
    assert "NeuronPCA" in captured.err  # the tqdm bar


def test_thin_data_warns_and_regularises_toward_the_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30))
    thin = [torch.randn(10, 40)]
    with pytest.warns(rw.ThinDataWarning, match=r"1 layer\(s\) saw fewer observations than their width: 0 \(10 for 30\)"):
        npca = rw.NeuronPCA(model, thin, verbosity="off")
    spectrum = npca.spectrum("0", "output")
    assert math.isclose(spectrum.regularization, 30 / 40)  # d_out / (n + d_out)
    assert torch.all(spectrum.eigenvalues > 0)  # full rank despite 10 observations
    raw = rw.NeuronPCA(model, thin, verbosity="off", regularization=0.0).spectrum("0", "output")
    assert int((raw.eigenvalues > 1e-5 * raw.eigenvalues[0]).sum()) <= 10


def test_fully_regularised_statistics_give_the_weights_singular_vectors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 12))
    npca = rw.NeuronPCA(model, make_batches((64, 20)), verbosity="off", regularization=1.0)
    u, _, _ = torch.linalg.svd(model[0].weight.detach().double())
    vectors = npca.spectrum("0", "output").eigenvectors
    torch.testing.assert_close((vectors.T @ u).abs().diagonal(), torch.ones(12, dtype=torch.float64))


def test_no_warning_with_enough_data():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rw.NeuronPCA(tiny_mlp(), make_batches((32, 12)), verbosity="off")


# Bad input: a clear error, and the model is left as it was ---------------------------------

def bad_nan_model():
    model = tiny_mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    return model


@pytest.mark.parametrize("model_factory, data, kwargs, error, message", [
    (tiny_mlp, [], {}, ValueError, "yielded no batch"),
    (tiny_mlp, [torch.randn(1, 12)], {}, ValueError, "saw 1 observation"),
    (tiny_mlp, [torch.randn(4, 12), torch.randn(4, 13)], {}, ValueError, "rejected batch 1"),
    (bad_nan_model, [torch.randn(4, 12)], {}, rw.NonFiniteActivationError, "batch 0: layer '2' has NaN or Inf in its output"),
    (tiny_mlp, [torch.randn(4, 12)], {"layer_names": ["nope"]}, ValueError, "'nope' is not a layer.*Projectable layers: 0, 2, 4"),
    (tiny_mlp, [torch.randn(4, 12)], {"layer_names": ["1"]}, ValueError, "'1' cannot be projected: ReLU layers are not supported"),
    (tiny_mlp, [torch.randn(4, 12)], {"verbosity": "loud"}, ValueError, "verbosity: expected one of"),
    (tiny_mlp, [torch.randn(4, 12)], {"regularization": 2}, ValueError, "regularization"),
    (tiny_mlp, [torch.randn(4, 12)], {"max_batches": 0}, ValueError, "max_batches"),
    (tiny_mlp, [object()], {}, ValueError, "rejected batch 0.*forward_fn"),
])
def test_bad_input_raises_clearly_and_leaves_the_model(model_factory, data, kwargs, error, message):
    model = model_factory()
    snapshot = state_of(model)
    with pytest.raises(error, match=message):
        rw.NeuronPCA(model, data, **{"verbosity": "off", **kwargs})
    assert_unchanged(model, snapshot)
    assert all(not m._forward_hooks for m in model.modules())


def test_input_side_of_a_linear_layer_is_not_analysed():
    npca = rw.NeuronPCA(tiny_mlp(), make_batches((32, 12)), verbosity="off")
    with pytest.raises(ValueError, match="layer '0' is a Linear layer.*use side='output'"):
        npca.spectrum("0", "input")
    with pytest.raises(ValueError, match="side: expected 'input' or 'output'"):
        npca.spectrum("0", "inputs")
    with pytest.raises(KeyError, match="'9' was not analysed"):
        npca.spectrum("9")


def test_grouped_convolution_is_not_projectable():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1))
    npca = rw.NeuronPCA(model, [torch.randn(2, 4, 6, 6)], verbosity="off")
    assert npca.layer_names == ["1"]
    with pytest.raises(ValueError, match="grouped convolution"):
        rw.NeuronPCA(model, [torch.randn(2, 4, 6, 6)], layer_names=["0"], verbosity="off")


def counting_spectra(monkeypatch) -> list:
    """Patch the eigen-decomposition behind every spectrum to record each call."""
    calls = []
    shrunk = rw.moments.Spectrum.shrunk.__func__

    def counted(cls, *args):
        calls.append(args)
        return shrunk(cls, *args)

    monkeypatch.setattr(rw.moments.Spectrum, "shrunk", classmethod(counted))
    return calls


def test_the_summary_computes_no_spectrum_until_the_range_is_asked(monkeypatch, capsys):
    calls = counting_spectra(monkeypatch)
    model, data = tiny_cnn(), make_batches((32, 3, 8, 8), count=2)
    npca = rw.NeuronPCA(model, data, verbosity="summary")
    summary = capsys.readouterr().out
    assert calls == [] and "learnables reduction range" not in summary
    assert "NeuronPCA: 3 layers, 2 batches" in summary and "npca.learnables_reduction_range" in summary
    low, high = npca.learnables_reduction_range
    assert len(calls) == 5 and 0 <= low <= high  # conv input and output, twice; the Linear's output
    rw.NeuronPCA(model, data, verbosity="steps")
    steps = capsys.readouterr().out
    assert len(calls) == 10 and f"learnables reduction range {low:.1%} to {high:.1%} (" in steps
    assert "s for the spectra and rank decisions" in steps


class OldFormatModel(nn.Module):
    """The model whose statistics ``tests/data/neuron_pca_v1.pt`` holds."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True)
        self.conv = nn.Conv1d(8, 5, 3)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.head(self.conv(h.transpose(1, 2)).transpose(1, 2))


def test_files_written_before_the_statistics_package_still_load():
    """``neuron_pca_v1.pt`` was written by rankwise at commit 3013aa4 (format_version 1), as
    ``torch.manual_seed(0); rw.NeuronPCA(OldFormatModel(), make_batches((8, 7, 3), count=2),
    verbosity="off").save(path)``."""
    old = rw.NeuronPCA.load(pathlib.Path(__file__).parent / "data" / "neuron_pca_v1.pt")
    torch.manual_seed(0)
    model = OldFormatModel()
    new = rw.NeuronPCA(model, make_batches((8, 7, 3), count=2), verbosity="off")
    assert old.layer_names == new.layer_names == ["rnn", "conv", "head"]
    assert (old.num_batches, old.network_learnables) == (2, rw.count_learnables(model))
    assert old.learnables_reduction_range == pytest.approx((0.0, 0.6226415094339622))  # as printed then
    assert old.learnables_reduction_range == pytest.approx(new.learnables_reduction_range)
    for name, side, cell in [("rnn", "input", "l1_reverse"), ("rnn", "output", "l0"),
                             ("conv", "input", None), ("head", "output", None)]:
        torch.testing.assert_close(old.spectrum(name, side, cell).eigenvalues,
                                   new.spectrum(name, side, cell).eigenvalues)


def test_a_file_of_another_format_is_refused(tmp_path):
    torch.save({"format_version": 99, "layers": {}}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="path: .*future.pt is not a NeuronPCA file of format version 1, 2, 3, 4, 5 "
                                         r"\(found 99\)"):
        rw.NeuronPCA.load(tmp_path / "future.pt")
