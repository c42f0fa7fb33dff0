"""Width evolution across a Flatten: one convolution channel is a block of H*W Linear features."""

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.evolve.graph import Consumer
from evolve_helpers import assert_same_function, outputs


class ViewNet(nn.Module):
    """Flattening written as ``x.view(x.size(0), -1)``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 16, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


def max_pool_net():
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 3))


def average_pool_net():
    """conv -> AvgPool -> Flatten -> Linear: nothing but linear maps, so the width is rotatable."""
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 3))


def inputs(size=8):
    return torch.randn(16, 2, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def evolver(model, x, **settings):
    return rw.WidthEvolver(model, x[:1], verbosity="off", **settings)


@pytest.mark.parametrize("factory, size, consumer", [
    (max_pool_net, 8, Consumer("4", 0, 16)), (ViewNet, 4, Consumer("fc", 0, 16))])
def test_a_flattened_channel_is_a_block_of_features(factory, size, consumer):
    torch.manual_seed(0)
    model = factory().double().eval()
    groups = evolver(model, inputs(size)).groups
    assert groups[next(iter(groups))].consumers == (consumer,)


@pytest.mark.parametrize("factory", [max_pool_net, average_pool_net])
def test_growing_the_convolution_is_exactly_function_preserving(factory):
    torch.manual_seed(0)
    model, x = factory().double().eval(), inputs()
    reference = outputs(model, x)
    evolver(model, x).grow("0", 3)
    first_linear = next(m for m in model if isinstance(m, nn.Linear))
    assert (model[0].out_channels, first_linear.in_features) == (9, 9 * 16)
    assert_same_function(model, x, reference, atol=1e-12)


def test_shrinking_with_zero_tolerance_is_function_preserving():
    torch.manual_seed(0)
    model, x = max_pool_net().double().eval(), inputs()
    reference = outputs(model, x)
    assert evolver(model, x, shrink_tol=0.0).shrink(data=[x]) == {}
    assert_same_function(model, x, reference)


def test_a_duplicated_channel_is_removed_block_by_block_with_data():
    torch.manual_seed(0)
    model, x = max_pool_net().double().eval(), inputs()
    with torch.no_grad():
        model[0].weight[4], model[0].bias[4] = model[0].weight[1], model[0].bias[1]
    reference = outputs(model, x)
    assert evolver(model, x, shrink_tol=1e-9).shrink(data=[x]) == {"0": (6, 5)}
    assert model[4].in_features == 5 * 16
    assert_same_function(model, x, reference, atol=1e-7)


def test_a_rank_deficient_convolution_is_rotated_into_its_top_subspace_exactly():
    torch.manual_seed(0)
    model, x = average_pool_net().double().eval(), inputs()
    with torch.no_grad():  # 6 output channels of rank 2 (bias in the same span)
        mixing = torch.randn(6, 2, dtype=torch.float64)
        model[0].weight.copy_(torch.einsum("or,rikl->oikl", mixing, torch.randn(2, 2, 3, 3, dtype=torch.float64)))
        model[0].bias.copy_(mixing @ torch.randn(2, dtype=torch.float64))
    reference = outputs(model, x)
    ev = evolver(model, x, shrink_tol=1e-9)
    assert ev.groups["0"].rotatable
    assert ev.shrink() == {"0": (6, 2)}
    assert model[3].in_features == 2 * 16
    assert_same_function(model, x, reference)
