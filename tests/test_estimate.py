"""rw.estimate_cost: the structure of the memory estimate (not its timings)."""

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.pca import NeuronPCA


def tensor_bytes(npca: NeuronPCA) -> int:
    """Bytes of the distinct tensors of the NeuronPCA's statistics (fitted part and gradients too)."""
    seen = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            list(map(visit, value.values()))
        elif isinstance(value, (list, tuple)):
            list(map(visit, value))
        elif hasattr(value, "__dict__"):
            list(map(visit, vars(value).values()))

    visit([npca._stats, npca._gradients, npca._validation[1] if npca._validation else None])
    return sum(seen.values())


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    return model, [torch.randn(20, 16) for _ in range(8)]


@pytest.mark.parametrize("settings", [{}, {"loss_fn": None}, {"loss_fn": None, "validation": None}])
def test_statistics_estimate_is_what_neuronpca_keeps(settings):
    model, data = model_and_data()
    estimate = rw.estimate_cost(model, data, **settings)
    npca = rw.NeuronPCA(model, data, verbosity="off", **settings)
    assert estimate.statistics_bytes == tensor_bytes(npca)
    assert set(estimate.layers) == set(npca.layer_names)
    assert sum(estimate.layers.values()) == estimate.statistics_bytes


def test_estimate_adds_up_and_grows_with_what_is_kept():
    model, data = model_and_data()
    full = rw.estimate_cost(model, data)
    lean = rw.estimate_cost(model, data, loss_fn=None, validation=None)
    assert full.peak_bytes == full.weights_bytes + full.statistics_bytes + max(full.calibration_bytes,
                                                                               full.decisions_bytes)
    assert full.weights_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert lean.statistics_bytes < full.statistics_bytes
    assert lean.calibration_bytes < full.calibration_bytes  # no backward pass
    assert "estimated peak" in str(full)


def test_estimate_restricted_to_the_chosen_layers():
    model, data = model_and_data()
    assert set(rw.estimate_cost(model, data, layer_names=["0"]).layers) == {"0"}


def test_estimate_without_batches_names_data():
    model, _ = model_and_data()
    with pytest.raises(ValueError, match="data"):
        rw.estimate_cost(model, [])
