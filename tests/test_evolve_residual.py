"""Width evolution through residual additions: tied widths move together, block widths alone."""

import torch
from torch import nn

import rankwise as rw
from evolve_helpers import (assert_same_function, assert_state_matches, loss_drops_after_one_step,
                            outputs, randomise_batchnorms)


class Block(nn.Module):
    def __init__(self, channels, inner):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResidualNet(nn.Module):
    """stem -> two blocks sharing the stem's width -> pooled head; a skip over the head too."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.block1 = Block(6, 10)
        self.block2 = Block(6, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        x = self.block2(self.block1(torch.relu(self.bn(self.stem(x)))))
        features = self.flatten(self.pool(x))
        return self.out(features + torch.relu(self.fc(features)))


def model_and_inputs():
    torch.manual_seed(0)
    model = randomise_batchnorms(ResidualNet().double()).eval()
    return model, torch.randn(16, 2, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


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


def test_growing_a_tied_group_and_a_block_is_exactly_function_preserving():
    model, x = model_and_inputs()
    reference, reference_train = outputs(model, x), outputs(model, x, train=True)
    ev = evolver(model, x)
    ev.grow("stem", 3)
    ev.grow("block2.conv1", 2)
    assert ev.widths() == {"stem": 9, "block1.conv1": 10, "block2.conv1": 6}
    assert model.block1.conv2.out_channels == model.fc.out_features == model.out.in_features == 9
    assert_same_function(model, x, reference, atol=1e-12)
    torch.testing.assert_close(outputs(model, x, train=True), reference_train, rtol=0, atol=1e-12)


def test_shrinking_with_zero_tolerance_is_function_preserving():
    model, x = model_and_inputs()
    reference = outputs(model, x)
    assert evolver(model, x, shrink_tol=0.0).shrink(data=[x]) == {}
    assert_same_function(model, x, reference)


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


def test_a_duplicated_block_channel_is_removed_exactly_with_data():
    model, x = model_and_inputs()
    with torch.no_grad():  # inner channel 3 of block 1 repeats channel 0 (rows and BatchNorm)
        model.block1.conv1.weight[3] = model.block1.conv1.weight[0]
        for tensor in (model.block1.bn1.weight, model.block1.bn1.bias,
                       model.block1.bn1.running_mean, model.block1.bn1.running_var):
            tensor[3] = tensor[0]
    reference = outputs(model, x)
    ev = evolver(model, x, shrink_tol=1e-9)
    assert ev.shrink(data=[x]) == {"block1.conv1": (10, 9)}
    assert_same_function(model, x, reference, atol=1e-7)
