"""The example networks of the kernel-truncation study: sizes, and every convolution truncatable."""

import pytest
import torch

import rankwise as rw
from rankwise.examples import mnist_vanilla_cnn, mnist_small_resnet


@pytest.mark.parametrize("factory, learnables, convolutions", [
    (mnist_vanilla_cnn, 91_594, ["0", "3", "6", "8"]),
    (mnist_small_resnet, 73_082, ["0", "3.conv1", "3.conv2", "3.shortcut.0", "4.conv1", "4.conv2", "4.shortcut.0"]),
])
def test_study_networks_have_their_size_and_truncate_exactly_at_full_rank(factory, learnables, convolutions):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(2, 1, 28, 28)
    assert rw.count_learnables(model) == learnables and model(x).shape == (2, 10)
    truncated, info = rw.truncate_kernels(model, "cut", norm_retained=1.0, verbosity="off", allow_larger=True)
    assert info.layer_names == convolutions
    with torch.no_grad():
        torch.testing.assert_close(truncated(x), model(x), atol=1e-4, rtol=1e-4)
