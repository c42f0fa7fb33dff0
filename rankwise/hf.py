"""Hugging Face model folders and sentence files, for the command line.

A *Hugging Face folder* is what ``model.save_pretrained(folder)`` writes: a ``config.json``
beside the weights (``tokenizer.save_pretrained`` adds the tokenizer's files). This module reads
such a folder without any download (``local_files_only=True``), turns a text file of one sentence
per line into padded batches of the model's inputs, and keeps a compressed model's config in
the metadata of its rankwise file, so that the structure is rebuilt from the config instead of
unpickled.

The batches are dicts with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the
tokenizer makes them), padded to the longest sentence of each batch, as
``tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")`` gives them; the
model is called as ``model(**batch)`` and the statistics leave the padding out through the
batch's ``attention_mask``.

``transformers`` is imported inside the functions only: ``import rankwise`` does not import it.
"""

from __future__ import annotations

import contextlib
import json
import pathlib

from torch import nn

from rankwise.checks import first_line
from rankwise.io import load, read_metadata

CONFIG_KEY = "rankwise_hf_config"
"""Metadata key of the model's config (``config.to_json_string()``) in a rankwise file."""
CLASS_KEY = "rankwise_hf_class"
"""Metadata key of the name of the model's ``transformers`` class (``"BertModel"``, ...)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
"""A folder holding none of these holds no tokenizer (transformers would build one with an empty
vocabulary from ``config.json`` alone, silently turning every word into ``[UNK]``)."""


def is_hf_folder(path) -> bool:
    """Whether ``path`` is a folder holding a ``config.json``."""
    return (pathlib.Path(path) / "config.json").is_file()


def load_hf_model(folder, quiet: bool = False) -> nn.Module:
    """The model saved in ``folder``, in eval mode, read with ``from_pretrained`` and no download.

    Its class is the first of ``config.architectures`` that ``transformers`` defines (the class
    that saved it: a ``BertForSequenceClassification`` keeps its head), else ``AutoModel``'s.
    ``quiet`` hides transformers' progress bar and messages while it reads.

    Raises
    ------
    ValueError
        When ``folder`` has no ``config.json`` or ``transformers`` cannot read it.
    """
    transformers = _transformers()
    if not is_hf_folder(folder):
        raise ValueError(f"folder: {str(folder)!r} holds no config.json; give a folder written by "
                         "model.save_pretrained(folder).")
    try:
        with _silenced(transformers, quiet):
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
            model = _model_class(config).from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"folder: transformers cannot read the model in {str(folder)!r} "
                         f"({first_line(error)}).") from None
    return model.eval()


def load_tokenizer(folder):
    """The tokenizer saved in ``folder`` (``AutoTokenizer``, no download).

    Raises
    ------
    ValueError
        When ``folder`` is not a folder or holds no tokenizer's files (:data:`TOKENIZER_FILES`).
    """
    transformers = _transformers()
    if not pathlib.Path(folder).is_dir():
        raise ValueError(f"tokenizer: {str(folder)!r} is not a folder; give the folder the "
                         "tokenizer was saved to (tokenizer.save_pretrained(folder)).")
    if not any((pathlib.Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"tokenizer: {str(folder)!r} holds no tokenizer (none of "
                         f"{', '.join(TOKENIZER_FILES)}); give the folder the tokenizer was saved to "
                         "(tokenizer.save_pretrained(folder)).")
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"tokenizer: {str(folder)!r} holds no tokenizer transformers can read "
                         f"({first_line(error)}); give the folder the tokenizer was saved to "
                         "(tokenizer.save_pretrained(folder)).") from None


def read_sentences(path) -> list[str]:
    """The non-blank lines of the UTF-8 text file ``path``, stripped: one sentence each.

    Raises
    ------
    ValueError
        When the file is not UTF-8 text or holds no sentence.
    """
    try:
        lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"path: {str(path)!r} is not UTF-8 text; give a text file of one sentence "
                         "per line.") from None
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise ValueError(f"path: {str(path)!r} holds no sentence; give a text file of one sentence "
                         "per line.")
    return sentences


DEFAULT_CHUNK_TOKENS = 256
"""A causal language model's calibration chunks: this many tokens of running text by default."""


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal language model (a ``...ForCausalLM`` class, or a config that
    says it is a decoder): its calibration text is running text, cut into chunks."""
    config = getattr(model, "config", None)
    return type(model).__name__.endswith("ForCausalLM") or bool(getattr(config, "is_decoder", False))


def chunked_batches(path, tokenizer, chunk_tokens: int, batch_size: int) -> list[dict]:
    """The UTF-8 text file ``path`` as running text: tokenized once (lines joined by newlines),
    cut into chunks of ``chunk_tokens`` tokens (the last, shorter one dropped when there is a
    full one), ``batch_size`` chunks per batch of ``input_ids`` and ``attention_mask``.

    Raises
    ------
    ValueError
        When the file is not UTF-8 text or holds fewer than 2 tokens.
    """
    import torch

    text = "\n".join(read_sentences(path))
    ids = torch.as_tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if len(ids) < 2:
        raise ValueError(f"path: {str(path)!r} holds fewer than 2 tokens; give running text to calibrate on.")
    chunks = list(ids.split(chunk_tokens))
    if len(chunks) > 1 and len(chunks[-1]) < chunk_tokens:
        chunks.pop()
    return [{"input_ids": torch.stack(group), "attention_mask": torch.ones(len(group), len(group[0]),
                                                                           dtype=torch.long)}
            for group in (chunks[start:start + batch_size] for start in range(0, len(chunks), batch_size))]


def tokenized_batches(sentences: list[list[str]], tokenizer, max_length: int | None) -> list[dict]:
    """Each group of ``sentences`` as one padded batch of model inputs.

    Parameters
    ----------
    sentences : list of list of str
        The sentences of each batch.
    tokenizer : transformers tokenizer
    max_length : int, optional
        Longer sentences are truncated to this many tokens; ``None``: to the tokenizer's
        ``model_max_length``.

    Returns
    -------
    list of dict of str to torch.Tensor
        ``input_ids``, ``attention_mask`` (1 for a token, 0 for padding), ... of shape
        ``(sentences in the batch, longest sentence's tokens)``.
    """
    return [dict(tokenizer(batch, padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt"))
            for batch in sentences]


def longest_input(model: nn.Module) -> int | None:
    """The most tokens ``model`` takes (``config.max_position_embeddings``), if it says."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def hf_metadata(model: nn.Module) -> dict[str, str]:
    """The entries of a rankwise file's metadata that rebuild ``model``'s structure: its config
    and class name (none for a model that is not a ``transformers`` one)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return {}
    return {CONFIG_KEY: config.to_json_string(), CLASS_KEY: type(model).__name__}


def load_compressed(path) -> nn.Module:
    """The model in a rankwise file that keeps a Hugging Face config (as ``rankwise compress``
    writes for a Hugging Face folder), its structure rebuilt from that config, nothing unpickled.

    The same as ``rw.load(path, model=AutoModel.from_config(AutoConfig.from_pretrained(folder)))``
    with the original folder (use the class that saved it in place of ``AutoModel`` for a model
    with a head, e.g. ``BertForSequenceClassification(config)``).

    Raises
    ------
    ValueError
        When ``path`` is not a rankwise file or keeps no Hugging Face config.
    """
    metadata = read_metadata(path)
    if CONFIG_KEY not in metadata:
        raise ValueError(f"path: {str(path)!r} keeps no Hugging Face config (it was not written from "
                         "a Hugging Face model); load it with rw.load(path, model=original).")
    return load(path, model=_stored_architecture(metadata))


def _stored_architecture(metadata: dict[str, str]) -> nn.Module:
    """The uncompressed model (random weights) that a rankwise file's ``metadata`` describes."""
    transformers = _transformers()
    values = json.loads(metadata[CONFIG_KEY])
    try:
        config = transformers.AutoConfig.for_model(**values)
    except (ValueError, KeyError) as error:
        raise ValueError(f"path: transformers cannot rebuild the config stored in the file "
                         f"({first_line(error)}).") from None
    model_class = getattr(transformers, metadata.get(CLASS_KEY, ""), None)
    return model_class(config) if model_class is not None else transformers.AutoModel.from_config(config)


def describe(metadata: dict[str, str]) -> str | None:
    """``"BertModel (model_type bert)"`` for a file with a Hugging Face config, else ``None``."""
    if CONFIG_KEY not in metadata:
        return None
    return f"{metadata.get(CLASS_KEY, '?')} (model_type {json.loads(metadata[CONFIG_KEY]).get('model_type')})"


def _model_class(config):
    transformers = _transformers()
    for name in getattr(config, "architectures", None) or ():
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


@contextlib.contextmanager
def _silenced(transformers, quiet: bool):
    """transformers' progress bars and messages below errors off while reading, when ``quiet``."""
    logging = transformers.utils.logging
    bar, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    if quiet:
        logging.disable_progress_bar()
        logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("Hugging Face folders and text data need transformers: "
                          "pip install transformers.") from None
    return transformers

