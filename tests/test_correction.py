"""Sequential error correction: the least-squares refit of a layer to the original output."""

import copy

import pytest
import torch
from torch import nn

from rankwise.correction import (corrected_layer, execution_order, input_rows, paired_moments)


def _pair(first, layer):
    original = nn.Sequential(first, layer).double()
    compressed = copy.deepcopy(original)
    with torch.no_grad():  # an invertible distortion of the first layer: the refit can undo it
        compressed[0].weight.copy_(compressed[0].weight * torch.linspace(0.5, 1.5, len(compressed[0].weight),
                                                                         dtype=torch.float64).view(-1, *[1] * (compressed[0].weight.dim() - 1)))
    return original, compressed


# The first layer keeps the width and has no bias: its distortion is then linear and invertible
# (padding zeros stay zeros), and the refit's Gram is invertible, so least squares undoes it exactly.
@pytest.mark.parametrize("layers, shape", [
    (lambda: (nn.Linear(6, 6, bias=False), nn.Linear(6, 4)), (40, 6)),
    (lambda: (nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(4, 5, 3, padding=1, stride=2)), (6, 4, 7, 7)),
    (lambda: (nn.Conv1d(3, 3, 1, bias=False), nn.Conv1d(3, 4, 2, dilation=2, bias=False)), (5, 3, 9)),
], ids=["linear", "conv2d", "conv1d"])
def test_the_refit_undoes_an_invertible_distortion_of_its_input(layers, shape):
    torch.manual_seed(0)
    original, compressed = _pair(*layers())
    data = [torch.randn(*shape, dtype=torch.float64) for _ in range(3)]
    moments = paired_moments(original, compressed, "1", data)
    compressed[1] = corrected_layer(original[1], moments, ridge=0.0)
    for x in data:
        torch.testing.assert_close(compressed(x), original(x))


def test_no_distortion_means_no_correction():
    torch.manual_seed(1)
    original = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    data = [torch.randn(16, 4, dtype=torch.float64)]
    moments = paired_moments(original, copy.deepcopy(original), "2", data)
    corrected = corrected_layer(original[2], moments, ridge=0.1)
    assert torch.equal(corrected.weight, original[2].weight) and torch.equal(corrected.bias, original[2].bias)


def test_input_rows_are_the_patches_the_kernel_reads():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1), bias=False)
    x = torch.randn(2, 3, 6, 7)
    rows = input_rows(conv, x)
    expected = conv(x).movedim(1, -1).reshape(-1, 4)
    torch.testing.assert_close(rows @ conv.weight.reshape(4, -1).T, expected)


def test_execution_order_follows_the_forward_not_the_definition():
    class Backwards(nn.Module):
        def __init__(self):
            super().__init__()
            self.late, self.early = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.late(self.early(x))

    assert execution_order(Backwards(), ["late", "early"], torch.randn(2, 3)) == ["early", "late"]
