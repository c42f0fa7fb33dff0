"""Width evolution across a Flatten: one convolution channel is a block of H*W Linear features.

Growing the convolution, shrinking with zero tolerance, removing a duplicated channel block by
block and rotating a rank-deficient convolution into its top subspace are rows of the table in
test_cases.py."""

import pytest
import torch

import rankwise as rw
from rankwise.evolve.graph import Consumer
from structures import ViewNet, max_pool_net


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


