"""Tiny models of the structural patterns Torch-Pruning tests one by one: a chain, residual
additions, concatenations, a flatten into a Linear, a module used twice, recurrent layers.

Shared by the width-evolution tests and the table of methods (test_cases.py). Every factory is
seeded, so two calls give the same weights.
"""

import torch
from torch import nn

from evolve_helpers import randomise_batchnorms


def chain():
    """fc1 -> BN -> ReLU -> fc2 -> fc3 (no activation: a rotatable width) -> out, float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 12),
                          nn.ReLU(), nn.Linear(12, 8), nn.Linear(8, 3)).double()
    return randomise_batchnorms(model).eval()


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


def residual_net():
    torch.manual_seed(0)
    return randomise_batchnorms(ResidualNet().double()).eval()


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


def concat_net():
    torch.manual_seed(0)
    return randomise_batchnorms(ConcatNet().double()).eval()


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
    """conv -> ReLU -> MaxPool -> Flatten -> Linear -> ReLU -> Linear, float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 3)).double().eval()


def average_pool_net():
    """conv -> AvgPool -> Flatten -> Linear: nothing but linear maps, so the width is rotatable."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 3)).double().eval()


class SharedNet(nn.Module):
    """One Linear applied twice (weights shared across two calls)."""

    def __init__(self):
        super().__init__()
        self.fc, self.square, self.out = nn.Linear(20, 20), nn.Linear(20, 20), nn.Linear(20, 3)

    def forward(self, x):
        return self.out(self.square(torch.relu(self.square(torch.relu(self.fc(x))))))


def shared_net():
    torch.manual_seed(0)
    return SharedNet().double().eval()


class Recurrent(nn.Module):
    """An LSTM or GRU over (N, T, D) sequences, a linear head on its last outputs."""

    def __init__(self, dense_type, **kwargs):
        super().__init__()
        self.rnn = dense_type(6, 12, batch_first=True, **kwargs)
        self.head = nn.Linear(12 * (2 if kwargs.get("bidirectional") else 1), 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def lstm_net():
    torch.manual_seed(0)
    return Recurrent(nn.LSTM).eval()


def gru_net():
    torch.manual_seed(0)
    return Recurrent(nn.GRU, bidirectional=True).eval()
