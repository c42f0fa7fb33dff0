"""rw.export_onnx: compressed models as one self-contained ONNX file, checked in onnxruntime."""

import shutil
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import rankwise as rw
import rankwise.export
from conftest import TINY_MODELS, assert_unchanged, make_batches, state_of

ort = pytest.importorskip("onnxruntime")


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["output"], {"input": x.numpy()})[0]


def run_copied_alone(path, x, tmp_path):
    """Copy the one .onnx file to a fresh folder (no sidecar can follow) and run it there."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return run_onnx(shutil.copy(path, elsewhere), x)


def record_exporters(monkeypatch):
    exporters, export = [], torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export",
                        lambda *args, **kwargs: exporters.append(kwargs["dynamo"]) or export(*args, **kwargs))
    return exporters


def force_torchscript(monkeypatch):
    export = torch.onnx.export

    def dynamo_fails(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("dynamo export unavailable\nsecond line")
        return export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)


def projected(name):
    torch.manual_seed(0)
    factory, shape = TINY_MODELS[name]
    model, data = factory().eval(), make_batches(shape)
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.5,
                                                     verbosity="off")
    assert info.layer_names
    return net, data, shape


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_unpacked_projected_model_matches_in_onnxruntime_from_the_single_file(tmp_path, monkeypatch,
                                                                             capsys, name):
    exporters = record_exporters(monkeypatch)
    net, data, shape = projected(name)
    snapshot = state_of(net)
    path = tmp_path / f"{name}.onnx"
    assert rw.export_onnx(net, path, data[0]) == "dynamo"
    assert exporters == [True]  # the torch.export-based exporter, no fallback
    assert capsys.readouterr().out == (f"export_onnx: wrote {path} (one self-contained file) with "
                                       f"the torch.export-based exporter (dynamo=True)\n")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]       # no .onnx.data sidecar
    assert_unchanged(net, snapshot)
    graph = onnx.load(path).graph
    assert {node.op_type for node in graph.node} & {"Gemm", "MatMul", "Conv"}
    other_batch = make_batches((3, *shape[1:]), count=1, seed=9)[0]  # the batch size is free
    with torch.no_grad():
        expected = net(other_batch).numpy()
    np.testing.assert_allclose(run_copied_alone(path, other_batch, tmp_path), expected, rtol=1e-4, atol=1e-5)


def onnx_interface(path):
    """What a user of the file sees: opset, names and shapes of the inputs and outputs, and
    whether every weight is inside the file."""
    model = onnx.load(path, load_external_data=False)
    def shapes(values):
        return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]
    return ([(o.domain, o.version) for o in model.opset_import], shapes(model.graph.input),
            shapes(model.graph.output),
            any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer))


def test_both_exporters_write_the_same_kind_of_file(tmp_path, monkeypatch, capsys):
    net, data, _ = projected("mlp")
    rw.export_onnx(net, tmp_path / "dynamo.onnx", data[0], verbosity="off")
    force_torchscript(monkeypatch)
    assert rw.export_onnx(net, tmp_path / "torchscript.onnx", data[0]) == "torchscript"
    assert capsys.readouterr().out == (
        f"export_onnx: wrote {tmp_path / 'torchscript.onnx'} (one self-contained file) with the "
        f"TorchScript-based exporter (dynamo=False) (the torch.export-based one failed: "
        f"dynamo export unavailable)\n")
    interface = onnx_interface(tmp_path / "torchscript.onnx")
    assert interface == onnx_interface(tmp_path / "dynamo.onnx")
    assert interface[1] == [("input", ["batch", 12])] and interface[3] is False
    with torch.no_grad():
        np.testing.assert_allclose(run_copied_alone(tmp_path / "torchscript.onnx", data[1], tmp_path),
                                   net(data[1]).numpy(), rtol=1e-4, atol=1e-5)


class Recurrent(nn.Module):
    """Conv1d over time, then an LSTM or a GRU (batch first), then a linear head on the last step."""

    def __init__(self, kind):
        super().__init__()
        self.conv = nn.Conv1d(6, 12, 3, padding=1)
        self.rnn = kind(12, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        outputs = self.rnn(torch.relu(self.conv(x)).transpose(1, 2))[0]
        return self.head(outputs[:, -1])


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_projected_lstm_and_gru_export_through_their_dense_form(tmp_path, monkeypatch, kind, exporter):
    torch.manual_seed(0)
    model, data = Recurrent(kind).eval(), make_batches((8, 6, 10))
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.4,
                                                     verbosity="off")
    assert isinstance(net.rnn, rw.ProjectedLSTM | rw.ProjectedGRU) and info.layers["rnn"].side != "dense"
    snapshot = state_of(net)
    if exporter == "torchscript":
        force_torchscript(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert rw.export_onnx(net, tmp_path / "rnn.onnx", data[0], verbosity="off") == exporter
    assert [str(w.message) for w in caught] == []      # nothing the user could act on
    assert_unchanged(net, snapshot)
    other_batch = make_batches((3, 6, 10), count=1, seed=9)[0]
    with torch.no_grad():
        expected = net(other_batch).numpy()
    np.testing.assert_allclose(run_copied_alone(tmp_path / "rnn.onnx", other_batch, tmp_path), expected,
                               rtol=1e-4, atol=1e-5)


def test_a_model_too_large_for_one_file_gets_its_weights_beside_it_and_says_so(tmp_path, monkeypatch, capsys):
    net, data, _ = projected("cnn")
    monkeypatch.setattr(rankwise.export, "SINGLE_FILE_LIMIT", 1000)   # as if the model took 2 GiB
    with pytest.warns(UserWarning, match="more than one ONNX file can hold.*keep the two files together"):
        rw.export_onnx(net, tmp_path / "big.onnx", data[0])
    assert "(weights in big.onnx.data beside it)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(tmp_path / "big.onnx", data[1]), net(data[1]).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_example_input_must_be_a_tensor(tmp_path):
    with pytest.raises(ValueError, match="example_input: expected one input tensor"):
        rw.export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx", [torch.zeros(1, 2)])


def test_verbosity_is_checked(tmp_path):
    with pytest.raises(ValueError, match="verbosity: expected one of"):
        rw.export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx", torch.zeros(1, 2), verbosity="loud")
    assert not (tmp_path / "x.onnx").exists()
