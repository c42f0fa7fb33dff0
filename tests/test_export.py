"""rw.export_onnx: compressed models as ONNX graphs of plain layers, checked in onnxruntime."""

import numpy as np
import onnx
import pytest
import torch

import rankwise as rw
from conftest import TINY_MODELS, assert_unchanged, make_batches, state_of

ort = pytest.importorskip("onnxruntime")


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["output"], {"input": x.numpy()})[0]


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_unpacked_projected_model_matches_in_onnxruntime(tmp_path, monkeypatch, name):
    exporters, export = [], torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export",
                        lambda *args, **kwargs: exporters.append(kwargs["dynamo"]) or export(*args, **kwargs))
    torch.manual_seed(0)
    factory, shape = TINY_MODELS[name]
    model, data = factory().eval(), make_batches(shape)
    net, info = rw.compress_network_using_projection(model, data, learnables_reduction_goal=0.5,
                                                     verbosity="off")
    assert info.layer_names
    snapshot = state_of(net)
    path = tmp_path / f"{name}.onnx"
    rw.export_onnx(net, path, data[0])
    assert exporters == [True]  # the torch.export-based exporter, no fallback
    assert_unchanged(net, snapshot)
    graph = onnx.load(path).graph
    assert {node.op_type for node in graph.node} & {"Gemm", "MatMul", "Conv"}
    other_batch = make_batches((3, *shape[1:]), count=1, seed=9)[0]  # the batch size is free
    with torch.no_grad():
        expected = net(other_batch).numpy()
    np.testing.assert_allclose(run_onnx(path, other_batch), expected, rtol=1e-4, atol=1e-5)


def test_falls_back_to_the_torchscript_exporter(tmp_path, monkeypatch):
    torch.manual_seed(0)
    factory, shape = TINY_MODELS["mlp"]
    model, data = factory().eval(), make_batches(shape)
    net, _ = rw.compress_network_using_projection(model, data, verbosity="off")
    export = torch.onnx.export

    def dynamo_fails(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("dynamo export unavailable")
        return export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    rw.export_onnx(net, tmp_path / "mlp.onnx", data[0])
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(tmp_path / "mlp.onnx", data[1]), net(data[1]).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_example_input_must_be_a_tensor(tmp_path):
    with pytest.raises(ValueError, match="example_input: expected one input tensor"):
        rw.export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx", [torch.zeros(1, 2)])
