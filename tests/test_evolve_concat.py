"""Width evolution through concatenations: offsets, BatchNorm over a concatenation, untracked parts."""

import torch
from torch import nn

import rankwise as rw
from rankwise.evolve.graph import ChannelMember, Consumer
from evolve_helpers import assert_same_function, outputs, randomise_batchnorms


class ConcatNet(nn.Module):
    """Two branches concatenated around the raw input, a BatchNorm over all of it, a mixing
    convolution, and a head that reads the mixed and one branch's channels after a Flatten."""

    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(3, 5, 3, padding=1)
        self.bn_left = nn.BatchNorm2d(5)
        self.right = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(5 + 3 + 4)
        self.mix = nn.Conv2d(12, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.out = nn.Linear((6 + 4) * 4, 3)

    def forward(self, x):
        a = torch.relu(self.bn_left(self.left(x)))
        b = torch.relu(self.right(x))
        h = torch.relu(self.bn(torch.cat([a, x, b], dim=1)))
        m = torch.relu(self.mix(h))
        return self.out(torch.flatten(self.pool(torch.cat([m, b], dim=-3)), 1))


def model_and_inputs():
    torch.manual_seed(0)
    model = randomise_batchnorms(ConcatNet().double()).eval()
    return model, torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def evolver(model, x, **settings):
    return rw.WidthEvolver(model, x[:1], verbosity="off", **settings)


def test_each_part_of_a_concatenation_gets_its_offset():
    model, x = model_and_inputs()
    groups = evolver(model, x).groups
    assert groups["left"].batchnorms == (ChannelMember("bn_left", 0), ChannelMember("bn", 0))
    assert groups["left"].consumers == (Consumer("mix", 0, 1),)
    assert groups["right"].batchnorms == (ChannelMember("bn", 8),)
    assert groups["right"].consumers == (Consumer("mix", 8, 1), Consumer("out", 6, 4))
    assert groups["mix"].consumers == (Consumer("out", 0, 4),)
    assert not any(g.tied for g in groups.values())


def test_growing_any_part_is_exactly_function_preserving():
    model, x = model_and_inputs()
    reference, reference_train = outputs(model, x), outputs(model, x, train=True)
    ev = evolver(model, x)
    ev.grow("left", 2)
    ev.grow("right", 3)
    ev.grow("mix", 1)
    assert (model.bn.num_features, model.mix.in_channels, model.out.in_features) == (17, 17, (7 + 7) * 4)
    assert_same_function(model, x, reference, atol=1e-12)
    torch.testing.assert_close(outputs(model, x, train=True), reference_train, rtol=0, atol=1e-12)


def test_shrinking_with_zero_tolerance_is_function_preserving():
    model, x = model_and_inputs()
    reference = outputs(model, x)
    assert evolver(model, x, shrink_tol=0.0).shrink(data=[x]) == {}
    assert_same_function(model, x, reference)


def test_a_duplicated_channel_inside_a_concatenation_is_removed_exactly_with_data():
    model, x = model_and_inputs()
    with torch.no_grad():  # right channel 3 repeats channel 1, also in the shared BatchNorm
        model.right.weight[3], model.right.bias[3] = model.right.weight[1], model.right.bias[1]
        for tensor in (model.bn.weight, model.bn.bias, model.bn.running_mean, model.bn.running_var):
            tensor[8 + 3] = tensor[8 + 1]
    reference = outputs(model, x)
    ev = evolver(model, x, shrink_tol=1e-9)
    assert ev.shrink(data=[x]) == {"right": (4, 3)}
    assert (model.bn.num_features, model.mix.in_channels, model.out.in_features) == (11, 11, (6 + 3) * 4)
    assert_same_function(model, x, reference, atol=1e-7)


def test_a_product_of_two_tracked_tensors_freezes_both_widths():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.value, self.gate, self.out = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.out(self.value(x) * torch.sigmoid(self.gate(x)))

    ev = evolver(Gated(), torch.randn(2, 4))
    assert ev.widths() == {}
    assert "used by mul" in ev.frozen["value"][0] and "used by mul" in ev.frozen["gate"][0]
