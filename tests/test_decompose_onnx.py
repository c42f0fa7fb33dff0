"""A model truncated with every kind of convolution sequence exports to ONNX and runs the same in onnxruntime."""

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import rankwise as rw

onnxruntime = pytest.importorskip("onnxruntime")


def truncated_model():
    """Pointwise, k x 1 / 1 x k, depthwise, grouped and diagonal (CP) convolutions in one model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                          nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect"),
                          nn.ReLU(), nn.Conv2d(6, 4, 3)).eval()
    model, _ = rw.truncate_kernels(model, "cut", cut="oi|hw", ranks=2, layer_names=["0"], verbosity="off")
    model, _ = rw.truncate_kernels(model, "tt", order="hwio", ranks=(2, 3, 4), layer_names=["2"],
                                   verbosity="off")
    model, _ = rw.truncate_kernels(model, "cp", ranks=5, layer_names=["4"], verbosity="off")
    model, _ = rw.truncate_kernels(model, "tucker", modes="oihw", ranks=(3, 4, 2, 2), layer_names=["6"],
                                   verbosity="off")
    return model


def onnx_bytes(model, example):
    """ONNX export with the dynamo exporter, the TorchScript one if it fails."""
    try:
        return torch.onnx.export(model, (example,), dynamo=True, verbose=False).model_proto.SerializeToString()
    except Exception:  # noqa: BLE001 - any dynamo failure falls back to the legacy exporter
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), buffer, dynamo=False)
        return buffer.getvalue()


def test_truncated_model_matches_in_onnxruntime():
    model = truncated_model()
    x = torch.randn(2, 3, 12, 12)
    session = onnxruntime.InferenceSession(onnx_bytes(model, x), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(output, expected, atol=1e-5, rtol=1e-4)
