"""The ``rankwise`` command: analyse, compress and inspect models from the shell.

::

    rankwise analyze MODEL --data DATA [--html FILE] [--json FILE]
    rankwise compress MODEL --data DATA (--explained-variance X | --learnables-reduction X)
                      [--layers A,B] [--unpack] --output FILE
    rankwise info FILE

MODEL is a Hugging Face model folder (``save_pretrained``: a ``config.json`` beside the
weights, read with ``from_pretrained`` and no download, :mod:`rankwise.hf`), a file written by
``torch.save(model)`` (a whole module) or by :func:`rankwise.save` (as ``rankwise compress``
writes: a Hugging Face model with its config, which rebuilds the structure; any other with its
structure pickled). A pickle runs code from the file when it is read: the command refuses it
unless given ``--trust-pickle`` (as ``torch.load`` defaults to ``weights_only=True``). As
``python -m`` does, the current folder is on the import path, so a model whose class lives in a
module there can be unpickled. DATA holds calibration inputs, read without unpickling anything:
a ``.pt`` file with a tensor or a list/tuple of tensors, or a ``.npy`` / ``.npz`` file, where
every tensor or array is inputs stacked along its first dimension, split into batches of
``--batch-size`` and given to the model as ``model(batch)``; or a ``.txt`` file of one sentence
per line, tokenized with ``--tokenizer`` (by default MODEL's folder) into padded batches given
as ``model(**batch)``, whose ``attention_mask`` keeps the padding out of the statistics; for a
causal language model (a ``...ForCausalLM``), the ``.txt`` file is running text, tokenized
whole and cut into chunks of ``--max-length`` tokens (256 by default), ``--batch-size`` chunks
per batch.
``--quiet`` hides progress bars and tables. The exit status is 0 on success and 2, with a
one-line message, on bad arguments or unreadable files.

Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` in the environment) ``analyze`` and
``compress`` join the launched process group (gloo on the CPU, nccl with ``--device cuda``,
each rank on its ``LOCAL_RANK`` GPU): rank ``r`` of ``W`` calibrates on batches ``r, r + W,
...`` of DATA, the statistics are summed over the group, and only rank 0 prints and writes.

The package: :mod:`~rankwise.cli.parser` (the commands and their options),
:mod:`~rankwise.cli.commands` (what each command does), :mod:`~rankwise.cli.inputs` (reading
MODEL and DATA), :mod:`~rankwise.cli.errors` (one-line usage errors) and
:mod:`~rankwise.cli.launch` (:func:`main`: one command line, under ``torchrun`` too).
"""

from rankwise.cli.inputs import read_data, read_model
from rankwise.cli.launch import main, run

__all__ = ["main", "read_data", "read_model", "run"]
