"""Width evolution through concatenations: offsets, BatchNorm over a concatenation, untracked parts.

Growing every part, shrinking with zero tolerance and removing a duplicated channel exactly are
rows of the table in test_cases.py."""

import torch
from torch import nn

import rankwise as rw
from rankwise.evolve.graph import ChannelMember, Consumer
from structures import concat_net


def model_and_inputs():
    return concat_net(), torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


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
