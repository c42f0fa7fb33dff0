"""Shared fixtures: a table of tiny models (as in peft's tests) and calibration data."""

import pytest
import torch
from torch import nn


def tiny_mlp():
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 5))


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(12 * 3 * 3, 10))


class SequenceModel(nn.Module):
    """Linear layers applied over (N, T, D) sequences, then a Conv1d over time."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 10)
        self.mix = nn.Conv1d(10, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.embed(x))                    # (N, T, 10)
        h = torch.relu(self.mix(h.transpose(1, 2)))      # (N, 8, T)
        return self.head(h.transpose(1, 2))              # (N, T, 4)


# name -> (factory, input shape of one batch)
TINY_MODELS = {
    "mlp": (tiny_mlp, (32, 12)),
    "cnn": (tiny_cnn, (32, 3, 8, 8)),
    "sequence": (SequenceModel, (8, 7, 6)),
}


def make_batches(shape, count=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for _ in range(count)]


@pytest.fixture(params=sorted(TINY_MODELS))
def model_and_data(request):
    torch.manual_seed(0)
    factory, shape = TINY_MODELS[request.param]
    return factory().eval(), make_batches(shape)


def low_rank_linear(in_features, out_features, rank, seed=0):
    """A Linear layer whose weight has exactly the given rank."""
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, rank, generator=generator)
                           @ torch.randn(rank, in_features, generator=generator) / rank)
    return layer


def state_of(model):
    """A deep snapshot of a model: structure and every tensor of its state."""
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snapshot):
    structure, state = snapshot
    assert repr(model) == structure
    current = model.state_dict()
    assert current.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(current[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def assert_identical(loaded, original, x):
    """The same structure, state dict (dtypes and values, bit for bit) and outputs on ``x``."""
    assert repr(loaded) == repr(original)
    ours, theirs = loaded.state_dict(), original.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))


def blob_task(seed=0, classes=4, dim=16, per_class=64):
    """A small trained classifier on Gaussian blobs, with train/val batches and an accuracy.

    Returns ``(model, train_batches, val_batches, accuracy)`` where ``accuracy(model)`` is the
    validation accuracy.
    """
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=generator)

    def sample(count):
        labels = torch.arange(classes).repeat_interleave(count)
        return centres[labels] + torch.randn(len(labels), dim, generator=generator), labels

    (x_train, y_train), (x_val, y_val) = sample(per_class), sample(per_class // 2)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(dim, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, classes))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x_train), y_train)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    train = list(zip(x_train.split(32), y_train.split(32)))
    val = list(zip(x_val.split(32), y_val.split(32)))

    def accuracy(m):
        with torch.no_grad():
            return (m(x_val).argmax(1) == y_val).float().mean().item()

    return model, train, val, accuracy


def assert_goal_met_by_the_built_modules(net, info, goal, high):
    """A learnables goal met (or the maximum ``high`` removed), and ``info`` describing ``net``."""
    import rankwise as rw

    assert info.goal_reached == (goal <= high)
    assert info.learnables_reduction >= min(goal, high) - 1e-12
    assert info.learnables_after == rw.count_learnables(net)
    for name, layer in info.layers.items():  # the info describes the modules really built
        module = net.get_submodule(name)
        assert rw.count_learnables(module) == layer.learnables_after
        if layer.side != "dense":
            assert (module.side, module.rank_in, module.rank_out) == (layer.side, layer.rank_in, layer.rank_out)
