"""The kinds table: a user's own layer type registered as a kind, and the per-family entries."""

import copy

import pytest
import torch
from torch import nn

import rankwise as rw
from conftest import assert_identical, assert_unchanged, make_batches, state_of
from rankwise import kinds
from rankwise.ranks.frontier import FRONTIERS
from rankwise.statistics import FAMILIES as STATISTICS


class Dense(nn.Module):
    """``y = W x + b`` of a library of its own: not an ``nn.Linear``, ``W`` kept as ``weight`` (out, in)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(d_out) / 10)

    def forward(self, x):
        return x @ self.weight.T + self.bias


class Kernel(nn.Module):
    """``y = x K + b`` with ``K = W^T`` kept as ``weight`` (in, out), as GPT-2's ``Conv1D`` keeps it."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) / d_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(d_out) / 10)

    def forward(self, x):
        return x @ self.weight + self.bias


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second, self.head = Dense(12, 32), Kernel(32, 24), nn.Linear(24, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.relu(self.first(x)))))


@pytest.fixture
def table(monkeypatch):
    """The kinds table as it is now, restored after the test (registering changes it)."""
    monkeypatch.setattr(kinds, "KINDS", list(kinds.KINDS))


def test_a_registered_layer_type_is_analysed_projected_saved_and_loaded(table, tmp_path):
    rw.register_kind("dense", Dense, wrapper=rw.ProjectedLinear)
    rw.register_kind("kernel", Kernel, wrapper=rw.ProjectedLinear, transposed=True)
    torch.manual_seed(0)
    model, data = Net().eval(), make_batches((16, 12), count=4)
    snapshot = state_of(model)
    npca = rw.NeuronPCA(model, data, verbosity="off")
    assert npca.layer_names == ["first", "second", "head"]
    net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=0.4, verbosity="off")
    assert_unchanged(model, snapshot)
    assert {info.layers[name].kind for name in ("first", "second")} == {"dense", "kernel"}
    assert {"first", "second"} <= set(info.layer_names)
    assert rw.count_learnables(net) == info.learnables_after < rw.count_learnables(model)
    full, _ = rw.compress_network_using_projection(model, npca, explained_variance_goal=1.0, verbosity="off")
    torch.testing.assert_close(full(data[0]), model(data[0]), rtol=1e-4, atol=1e-5)
    rw.save(net, tmp_path / "net.safetensors")
    assert_identical(rw.load(tmp_path / "net.safetensors", model=Net()), net.eval(), data[0])
    unpacked = rw.unpack_projected_layers(net)
    rw.save(unpacked, tmp_path / "unpacked.safetensors")
    assert_identical(rw.load(tmp_path / "unpacked.safetensors", model=Net()), unpacked.eval(), data[0])


def test_a_registered_subclass_of_a_supported_type_gets_its_own_row(table):
    class Gated(nn.Linear):
        pass

    row = rw.register_kind("gated", Gated, wrapper=rw.ProjectedLinear,
                           refusal=lambda layer: "it is gated" if layer.in_features < 4 else None)
    assert kinds.kind_of(Gated(8, 4)) is row and kinds.kind_of(nn.Linear(8, 4)).name == "linear"
    model = nn.Sequential(Gated(2, 4))
    with pytest.raises(ValueError, match="layer_names: '0' cannot be projected: it is gated"):
        rw.NeuronPCA(model, [torch.randn(4, 2)], layer_names="0", verbosity="off")


@pytest.mark.parametrize("arguments, message", [
    (dict(name="linear", types=Dense), "name: expected a new kind name"),
    (dict(name="", types=Dense), "name: expected a new kind name"),
    (dict(name="dense", types=nn.Linear), "types: Linear is already the kind 'linear'"),
    (dict(name="dense", types=int), "types: expected one or more torch.nn.Module subclasses"),
    (dict(name="dense", types=()), "types: expected one or more"),
    (dict(name="dense", types=Dense, family="recurrent"), "family: expected one of 'dense', 'embedding'"),
    (dict(name="dense", types=Dense, sides=("middle",)), "sides: expected"),
    (dict(name="dense", types=Dense, wrapper=nn.Linear), "wrapper: expected a ProjectedLayer subclass"),
    (dict(name="dense", types=Dense, refusal="no"), "refusal: expected a function"),
])
def test_register_kind_refuses_what_it_cannot_handle(table, arguments, message):
    before = list(kinds.KINDS)
    with pytest.raises(ValueError, match=message):
        rw.register_kind(**{"wrapper": rw.ProjectedLinear, **arguments})
    assert kinds.KINDS == before


def test_every_family_has_its_statistics_and_its_options():
    """A family is one entry here and one in each of the statistics and the frontiers: none is missing."""
    assert set(kinds.FAMILIES) == set(STATISTICS) == set(FRONTIERS)
    assert {kind.family for kind in kinds.KINDS} == set(kinds.FAMILIES)


def test_the_projected_recurrence_is_exported_as_its_dense_layer():
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 8, batch_first=True)
    projected = rw.ProjectedLSTM.from_dense(lstm, input_basis={"l0": torch.eye(6)[:, :3]})
    dense = copy.deepcopy(projected).dense()
    assert type(dense) is nn.LSTM
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(dense(x)[0], projected(x)[0])
    assert type(rw.ProjectedLinear.from_dense(nn.Linear(6, 8), output_basis=torch.eye(8)[:, :2]).dense()) \
        is nn.Sequential
