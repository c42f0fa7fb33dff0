"""Reading the command line's inputs: MODEL (a Hugging Face folder, a rankwise.save file or a
torch.save file) and DATA (tensors, arrays or sentences), into a module and its batches.

Nothing is unpickled unless asked: a pickled structure is read only with ``trust_pickle``, and
calibration data never. A problem with a file is a :class:`~rankwise.cli.errors.UsageError`
naming the argument (``MODEL``, ``--data``, ``--tokenizer``).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import pickle
import sys
import zipfile

import numpy as np
import torch
from torch import nn

from rankwise import hf
from rankwise import io as rankwise_io
from rankwise.cli.errors import UsageError, library

DATA_FORMATS = {".pt": "torch.save of a tensor or a list of tensors",
                ".pth": "torch.save of a tensor or a list of tensors",
                ".npy": "numpy.save of an array", ".npz": "numpy.savez of arrays",
                ".txt": "one sentence per line"}


def read_model(path: str, trust_pickle: bool, quiet: bool = False) -> nn.Module:
    """The module in ``path``: a Hugging Face folder, a rankwise.save file, else a torch.save
    file; a pickled structure is unpickled only when ``trust_pickle``. ``quiet``: no progress
    bar while transformers reads a folder."""
    if pathlib.Path(path).is_dir():
        if not hf.is_hf_folder(path):
            raise UsageError(f"MODEL: {path!r} is a folder without config.json; give a Hugging Face "
                             "model folder (model.save_pretrained(folder)) or a file written by "
                             "torch.save(model) or rankwise.save.")
        return library(hf.load_hf_model, path, quiet, argument="MODEL")
    readable(path, "MODEL")
    if _is_safetensors(path):
        return _rankwise_model(path, trust_pickle)
    if not zipfile.is_zipfile(path):
        raise UsageError(f"MODEL: {path!r} is neither a safetensors file nor a torch.save archive; "
                         "give a file written by torch.save(model) or rankwise.save.")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # it holds more than tensors and containers: a module?
        return _unpickled_model(path, trust_pickle)
    except Exception:
        raise UsageError(f"MODEL: {path!r} is a zip archive but not one written by torch.save; "
                         "give a file written by torch.save(model) or rankwise.save.") from None
    raise UsageError(f"MODEL: {path!r} holds an object of type {type(content).__name__}, not a "
                     "model (a state dict holds weights only); write the whole module with "
                     "torch.save(model, path).")


def _is_safetensors(path: str) -> bool:
    try:
        rankwise_io.read_spec(path)
    except ValueError as error:
        return "not a safetensors file" not in str(error)
    return True


def _rankwise_model(path: str, trust_pickle: bool) -> nn.Module:
    """A safetensors file: a rankwise one that stores its architecture, unpickled if trusted."""
    library(rankwise_io.read_spec, path, argument="MODEL")  # a rankwise file of a known format
    if hf.CONFIG_KEY in rankwise_io.read_metadata(path):
        return library(hf.load_compressed, path, argument="MODEL")
    if not rankwise_io.has_architecture(path):
        raise UsageError(f"MODEL: {path!r} stores no architecture, which the command line needs; "
                         "save it with rw.save(..., include_architecture=True), or load it in Python "
                         "with rw.load(path, model=original).")
    if not trust_pickle:
        raise UsageError(f"MODEL: {path!r} stores its architecture as a pickle, and unpickling runs "
                         "code from the file; pass --trust-pickle if you trust it.")
    with _current_folder_importable():
        return library(rankwise_io.load, path, trust_pickle=True, argument="MODEL")


def _unpickled_model(path: str, trust_pickle: bool) -> nn.Module:
    """A torch.save file that holds more than tensors: unpickled if trusted, and a module."""
    if not trust_pickle:
        raise UsageError(f"MODEL: {path!r} is a torch.save pickle, and unpickling runs code from the "
                         "file; pass --trust-pickle if you trust it.")
    try:
        with _current_folder_importable():
            model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # unpickling raises anything the file's code raises
        raise UsageError(f"MODEL: {path!r} cannot be unpickled "
                         f"({rankwise_io.unpickling_failure(error)}).") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"MODEL: {path!r} holds an object of type {type(model).__name__}, not a "
                         "model; write the whole module with torch.save(model, path).")
    return model


@contextlib.contextmanager
def _current_folder_importable():
    """The current folder first on ``sys.path`` (as ``python -m`` puts it), for unpickling."""
    folder = os.getcwd()
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)


def read_data(path: str, model: nn.Module, batch_size: int, tokenizer: str | None = None,
              max_length: int | None = None, shard: tuple[int, int] = (0, 1)) -> list:
    """Batches of at most ``batch_size`` inputs from a .pt, .npy, .npz or .txt file: this
    rank's share of them, batches ``rank, rank + world, ...`` for ``shard = (rank, world)``.

    Floating-point inputs are cast to the model's floating dtype; others are kept as they are.
    A .txt file holds one sentence per line, tokenized with the tokenizer saved in the folder
    ``tokenizer`` (truncated to ``max_length`` tokens, by default the most the model takes) into
    padded dict batches (:func:`rankwise.hf.tokenized_batches`); for a causal language model
    (:func:`rankwise.hf.is_causal_lm`) it is running text, cut into chunks of ``max_length``
    tokens (256 by default, at most what the model takes; :func:`rankwise.hf.chunked_batches`).
    """
    readable(path, "--data")
    rank, world = shard
    if pathlib.Path(path).suffix.lower() == ".txt":
        return _sentence_batches(path, model, batch_size, tokenizer, max_length, shard)
    return _tensor_batches(path, model, batch_size)[rank::world]


def _sentence_batches(path: str, model: nn.Module, batch_size: int, tokenizer: str | None,
                      max_length: int | None, shard: tuple[int, int]) -> list[dict]:
    if tokenizer is None:
        raise UsageError(f"--tokenizer: the sentences in {path!r} need a tokenizer; give --tokenizer "
                         "FOLDER (the folder tokenizer.save_pretrained wrote, often the model's).")
    loaded = library(hf.load_tokenizer, tokenizer, argument="--tokenizer")
    rank, world = shard
    if hf.is_causal_lm(model):  # running text in chunks of --max-length tokens
        length = max_length or min(n for n in (hf.DEFAULT_CHUNK_TOKENS, hf.longest_input(model)) if n)
        return library(hf.chunked_batches, path, loaded, length, batch_size, argument="--data")[rank::world]
    sentences = library(hf.read_sentences, path, argument="--data")
    if max_length is None:
        max_length = min((n for n in (hf.longest_input(model), loaded.model_max_length) if n), default=None)
    groups = [sentences[start:start + batch_size] for start in range(0, len(sentences), batch_size)]
    return hf.tokenized_batches(groups[rank::world], loaded, max_length)


def _tensor_batches(path: str, model: nn.Module, batch_size: int) -> list[torch.Tensor]:
    arrays = _arrays(path)
    if not arrays:
        raise UsageError(f"--data: {path!r} holds no tensor.")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    batches = []
    for array in arrays:
        tensor = torch.as_tensor(array)
        if tensor.dim() == 0:
            raise UsageError(f"--data: {path!r} holds a scalar; expected inputs stacked along "
                             "a first dimension.")
        batches += list((tensor.to(dtype) if tensor.is_floating_point() else tensor).split(batch_size))
    return batches


def _arrays(path: str) -> list:
    suffix = pathlib.Path(path).suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            return _tensors(torch.load(path, map_location="cpu", weights_only=True), path)
        if suffix == ".npy":
            return [np.load(path, allow_pickle=False)]
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return [archive[key] for key in archive.files]
    except UsageError:
        raise
    except Exception:
        raise UsageError(f"--data: {path!r} is not a readable {suffix} file of tensors or arrays "
                         f"({DATA_FORMATS[suffix]}); give inputs saved that way.") from None
    raise UsageError(f"--data: expected a .pt, .npy or .npz file, got {path!r}.")


def _tensors(content, path: str) -> list[torch.Tensor]:
    if isinstance(content, torch.Tensor):
        return [content]
    if isinstance(content, list | tuple) and all(isinstance(t, torch.Tensor) for t in content):
        return list(content)
    raise UsageError(f"--data: {path!r} holds an object of type {type(content).__name__}; expected "
                     "a tensor or a list/tuple of tensors.")


def readable(path: str, argument: str) -> str:
    """``path``, checked to be a file; else a UsageError naming ``argument``."""
    if not pathlib.Path(path).is_file():
        problem = "is a folder" if pathlib.Path(path).is_dir() else "does not exist"
        raise UsageError(f"{argument}: {path!r} {problem}.")
    return path

