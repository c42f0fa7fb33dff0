"""Width evolution through residual additions: tied widths move together, block widths alone.

Growing a tied group and a block, shrinking with zero tolerance and removing a duplicated block
channel exactly are rows of the table in test_cases.py."""

import torch

import rankwise as rw
from evolve_helpers import assert_state_matches, loss_drops_after_one_step, outputs
from structures import residual_net


def model_and_inputs():
    return residual_net(), torch.randn(16, 2, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def evolver(model, x, **settings):
    return rw.WidthEvolver(model, x[:1], verbosity="off", **settings)


def test_additions_tie_the_stem_to_every_block_output():
    model, x = model_and_inputs()
    ev = evolver(model, x)
    stem = ev.groups["stem"]
    assert stem.producers == ("stem", "block1.conv2", "block2.conv2", "fc") and stem.tied
    assert {m.name for m in stem.batchnorms} == {"bn", "block1.bn2", "block2.bn2"}
    assert {c.name for c in stem.consumers} == {"block1.conv1", "block2.conv1", "fc", "out"}
    assert ev.widths() == {"stem": 6, "block1.conv1": 10, "block2.conv1": 4}
    assert "tied by additions" in ev.summary()


def test_shrinking_a_tied_group_keeps_every_member_consistent():
    model, x = model_and_inputs()
    targets = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    ev = evolver(model, x, shrink_tol=0.8, grow_tol=0.9, min_width=2)
    ev.attach(optimizer)
    loss_drops_after_one_step(model, optimizer, x, targets)
    changed = ev.shrink(data=[x])
    assert "stem" in changed
    width = ev.widths()["stem"]
    assert {model.stem.out_channels, model.bn.num_features, model.block1.conv2.out_channels,
            model.block1.bn2.num_features, model.block2.conv2.out_channels, model.fc.out_features,
            model.block2.bn2.num_features, model.block1.conv1.in_channels, model.fc.in_features,
            model.out.in_features} == {width}
    assert outputs(model, x).shape == (16, 3)
    assert_state_matches(optimizer)
    assert loss_drops_after_one_step(model, optimizer, x, targets)


