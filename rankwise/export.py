"""export_onnx: a (compressed) model as one self-contained ONNX file of plain layers."""

from __future__ import annotations

import contextlib
import pathlib
import tempfile
import warnings

import torch
from torch import nn

from rankwise.checks import check_verbosity, first_line
from rankwise.forms import dense_forms

OPSET = 20
"""The ONNX opset both exporters write (the torch.export-based exporter's default in torch 2.14)."""
SINGLE_FILE_LIMIT = 2 ** 31 - 1
"""Protocol buffers, hence ONNX files without external data, hold at most 2 GiB."""
EXPORTERS = {True: "the torch.export-based exporter (dynamo=True)",
             False: "the TorchScript-based exporter (dynamo=False)"}
INTERNAL_WARNINGS = (
    ".*_check_is_size will be removed.*",           # torch's own tracing internals
    ".*were assigned during export.*",              # nn.LSTM's _flat_weights, rebuilt by torch
    ".*legacy TorchScript-based ONNX export.*",     # the fallback is chosen here, not by the user
    ".*feature will be removed.*",
    ".*batch_size other than 1.*",                  # the batch dimension is declared free
)
"""Warnings of the exporters that the user of :func:`export_onnx` cannot act on."""


def export_onnx(model: nn.Module, path, example_input: torch.Tensor, *, dynamic_batch: bool = True,
                verbosity: str = "summary") -> str:
    """Write ``model`` to ``path`` as one self-contained ONNX file of plain layers.

    A copy of the model is made plain: each compressed form replaced by its ``dense()``
    (:func:`rankwise.forms.dense_forms`): its unpacked layers, so that the graph holds only
    ``Linear`` / ``Conv`` / ``Embedding`` nodes, and for a
    :class:`~rankwise.layers.ProjectedLSTM` / ``ProjectedGRU`` the ``nn.LSTM`` / ``nn.GRU``
    with the rebuilt weights ``W Q Q^T``, which computes the same outputs (the projected
    recurrence has no ONNX form). The copy is
    exported in eval mode with ``torch.onnx.export(dynamo=True)``; where that exporter fails,
    the TorchScript-based one (``dynamo=False``) is tried. Either way the file is the same
    kind: opset ``OPSET``, input ``"input"``, output ``"output"``, first dimension named
    ``"batch"`` (when free), and the weights inside the file, so that it can be copied alone.
    A model over 2 GiB cannot be held in one ONNX file: its weights are then written beside
    it, to ``<path>.data``, and a warning says so (keep the two files together).

    Parameters
    ----------
    model : torch.nn.Module
        Not modified.
    path : str or os.PathLike
        The ``.onnx`` file to write.
    example_input : torch.Tensor
        One input batch, on the model's device, to trace the model with.
    dynamic_batch : bool
        Leave the first dimension of the input and output free (any batch size).
    verbosity : {"off", "summary", "steps", "iterations"}
        ``"off"`` prints nothing; otherwise one line names the file and the exporter used.

    Returns
    -------
    str
        ``"dynamo"`` or ``"torchscript"``: the exporter that wrote the file.

    Raises
    ------
    ValueError
        When ``example_input`` is not a tensor or ``verbosity`` is unknown.
    RuntimeError
        When neither exporter can export the model (both errors are chained).
    """
    import onnx  # imported here: optional dependency (rankwise[onnx])

    check_verbosity(verbosity)
    if not isinstance(example_input, torch.Tensor):
        raise ValueError(f"example_input: expected one input tensor, got {type(example_input).__name__}.")
    path = pathlib.Path(path)
    plain = dense_forms(model).eval()
    with tempfile.TemporaryDirectory() as folder:
        exported = pathlib.Path(folder) / "model.onnx"
        dynamo, fallback_reason = _export(plain, example_input, exported, dynamic_batch)
        proto = onnx.load(exported)  # the weights too, wherever the exporter put them
    if dynamic_batch:
        _name_batch_dimension(proto)
    single = _save(proto, path)
    if verbosity != "off":
        print(_summary(path, dynamo, fallback_reason, single))
    return "dynamo" if dynamo else "torchscript"


def _export(plain: nn.Module, example_input: torch.Tensor, path: pathlib.Path, dynamic_batch: bool):
    """Export with the torch.export-based exporter, else the TorchScript one.

    Returns ``(dynamo, reason)``: whether the first one wrote the file, and why it failed if not.
    """
    names = dict(input_names=["input"], output_names=["output"], opset_version=OPSET)
    with _quiet_exporters():
        try:
            torch.onnx.export(plain, (example_input,), path, dynamo=True, verbose=False, **names,
                              dynamic_shapes=({0: torch.export.Dim.DYNAMIC},) if dynamic_batch else None)
            return True, None
        except Exception as dynamo_error:  # the exporters raise many types; try the other one
            try:
                torch.onnx.export(plain, (example_input,), path, dynamo=False, **names,
                                  dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}
                                  if dynamic_batch else None)
            except Exception as legacy_error:
                raise RuntimeError(f"export_onnx: neither ONNX exporter could export the model "
                                   f"(dynamo: {dynamo_error}; TorchScript: {legacy_error}).") \
                    from legacy_error
            return False, first_line(dynamo_error)


@contextlib.contextmanager
def _quiet_exporters():
    """The exporters' warnings in ``INTERNAL_WARNINGS`` and the tracer's warnings about torch's own
    layers (``nn.LSTM`` reading its batch sizes) ignored; others, those about the user's own
    modules included, shown as usual."""
    with warnings.catch_warnings():
        for message in INTERNAL_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\.")
        yield


def _name_batch_dimension(proto) -> None:
    """Name the first dimension of every graph input and output ``"batch"`` (exporters differ)."""
    for value in (*proto.graph.input, *proto.graph.output):
        shape = value.type.tensor_type.shape
        if shape.dim and not shape.dim[0].HasField("dim_value"):
            shape.dim[0].dim_param = "batch"


def _save(proto, path: pathlib.Path) -> bool:
    """Write ``proto`` as one file when it fits, else with its weights in ``<path>.data``.

    Returns whether the file is self-contained.
    """
    import onnx

    if proto.ByteSize() <= SINGLE_FILE_LIMIT:
        onnx.save_model(proto, path, save_as_external_data=False)
        return True
    sidecar = path.name + ".data"
    warnings.warn(f"export_onnx: the model takes {proto.ByteSize() / 2 ** 30:.2f} GiB, more than one "
                  f"ONNX file can hold (2 GiB); its weights are written to {sidecar} beside {path.name}: "
                  f"keep the two files together.", stacklevel=3)
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=sidecar)
    return False


def _summary(path: pathlib.Path, dynamo: bool, fallback_reason: str | None, single: bool) -> str:
    """The one line printed at ``verbosity="summary"``."""
    contents = "one self-contained file" if single else f"weights in {path.name}.data beside it"
    fallback = "" if dynamo else f" (the torch.export-based one failed: {fallback_reason})"
    return f"export_onnx: wrote {path} ({contents}) with {EXPORTERS[dynamo]}{fallback}"

