"""export_onnx: a (compressed) model as an ONNX graph of plain layers."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from rankwise.projection import unpack_projected_layers


def export_onnx(model: nn.Module, path, example_input: torch.Tensor, *,
                dynamic_batch: bool = True) -> None:
    """Write ``model`` to ``path`` as ONNX, its compressed forms unpacked into plain layers.

    A copy of the model is unpacked (:func:`~rankwise.unpack_projected_layers`, so the graph
    holds only ``Linear`` / ``Conv`` nodes) and exported in eval mode with
    ``torch.onnx.export(dynamo=True)``; where that exporter fails, the TorchScript-based one
    (``dynamo=False``) is tried. The graph's input is named ``"input"`` and its output
    ``"output"``.

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

    Raises
    ------
    RuntimeError
        When neither exporter can export the model (both errors are chained).
    """
    if not isinstance(example_input, torch.Tensor):
        raise ValueError(f"example_input: expected one input tensor, got {type(example_input).__name__}.")
    plain = unpack_projected_layers(model).eval()
    names = dict(input_names=["input"], output_names=["output"])
    try:
        torch.onnx.export(plain, (example_input,), path, dynamo=True, verbose=False, **names,
                          dynamic_shapes=({0: torch.export.Dim.DYNAMIC},) if dynamic_batch else None)
    except Exception as dynamo_error:  # the exporters raise many types; try the other one
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=".*feature will be removed.*")
            try:
                torch.onnx.export(plain, (example_input,), path, dynamo=False, **names,
                                  dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}
                                  if dynamic_batch else None)
            except Exception as legacy_error:
                raise RuntimeError(f"export_onnx: neither ONNX exporter could export the model "
                                   f"(dynamo: {dynamo_error}; TorchScript: {legacy_error}).") \
                    from legacy_error
