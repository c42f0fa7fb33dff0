"""Sequential error correction: each layer refitted to the original output, given the compressed input.

Projected one at a time from the input side, layer ``l`` of the compressed network no longer
sees the original network's input rows ``u`` but ``u~``, the rows the compressed layers before it
produce. One-shot projection ignores this, and small per-layer errors compound over depth.
Sequential correction (as in GPTQ- and SVD-LLM-style sequential calibration) first replaces each
layer by the affine map of ``u~`` closest to the original layer's output on the calibration data,

    min_{W', b'}  E | W u + b - (W' u~ + b') |^2,

where a row is a layer's input as its weight reads it: a ``Linear`` input vector (of a real
token only, under a token mask: :mod:`rankwise.masks`), or one patch
of a convolution (``in * kernel`` values, as ``torch.nn.functional.unfold`` lays them out, so
that ``W`` is the ``(out, in * kernel)`` matrix). Written as a correction of the original,
``W' = W + D``, ``b' = b + e``, with ``z = [u~; 1]`` (``z = u~`` for a layer without bias):

    [D e] = W E[(u - u~) z^T] (E[z z^T] + lambda I)^-1,     lambda = ridge * tr(E[z z^T]) / dim z.

The ridge pulls toward no correction, the one-shot solution (exact when ``u~ = u``: then
``D = 0``), where the data are too few to trust. The corrected layer is then analysed on the
compressed network's inputs and projected at the ranks already chosen: its output projection is
the reduced-rank regression of the original output on ``u~``, because the least-squares residual
``W u + b - (W' u~ + b')`` is orthogonal to every affine function of ``u~``, so that for any
rank-``r`` affine map ``y'`` of ``u~``

    E |y - y'|^2 = E |y - y^|^2 + E |y^ - y'|^2,     y^ = W' u~ + b',

and the best ``y'`` is the rank-``r`` PCA of ``y^``. Cost: per corrected layer, one pass of both
networks up to that layer.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from rankwise.batches import as_batches, default_forward, forward, model_device, move_to
from rankwise.forms import fused_paths_off
from rankwise.kinds import channels_last, convolution_dims, kind_of
from rankwise.layers.build import project_layer
from rankwise.masks import TokenMask, active_mask, token_rows
from rankwise.pca import NeuronPCA, ThinDataWarning
from rankwise.ranks import layer_options

RIDGE = 1e-3
"""Default ridge of the refit, relative to the mean eigenvalue of ``E[z z^T]``."""


@dataclass
class PairedMoments:
    """Sums over the rows of one layer: ``sum (u - u~) z^T`` and ``sum z z^T``, float64."""

    cross: torch.Tensor
    gram: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, dim: int, with_bias: bool, device) -> "PairedMoments":
        z = dim + int(with_bias)
        return cls(torch.zeros(dim, z, dtype=torch.float64, device=device),
                   torch.zeros(z, z, dtype=torch.float64, device=device))

    def update(self, original: torch.Tensor, compressed: torch.Tensor) -> None:
        """Add the rows ``u`` (original) and ``u~`` (compressed), both ``(m, dim)``."""
        z = compressed.to(torch.float64)
        if self.gram.shape[0] > z.shape[1]:
            z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype, device=z.device)], 1)
        self.cross += (original.to(torch.float64) - compressed.to(torch.float64)).T @ z
        self.gram += z.T @ z
        self.count += len(z)


UNFOLDED_DIMS = (1, 2)
"""The convolutions whose patches ``torch.nn.functional.unfold`` lays out, by spatial dimensions."""


def correctable(layer: nn.Module) -> bool:
    """Whether :func:`input_rows` can lay out ``layer``'s input: a layer of a refittable family
    (:attr:`rankwise.kinds.Family.refittable`) reading its channels last (a ``Linear``, GPT-2's
    ``Conv1D``), or a ``Conv1d`` / ``Conv2d`` with numeric zero padding."""
    kind = kind_of(layer)
    if kind is None or not kind.traits.refittable:
        return False
    if channels_last(layer):
        return True
    return (convolution_dims(layer) in UNFOLDED_DIMS and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str))


def input_rows(layer: nn.Module, inputs: torch.Tensor, mask: TokenMask | None = None) -> torch.Tensor:
    """The rows ``W`` reads from ``inputs``: ``(rows, in * kernel)`` (see the module docstring);
    those of a layer reading its channels last without the padding positions of ``mask``
    (:mod:`rankwise.masks`)."""
    if channels_last(layer):
        return token_rows(inputs, mask).reshape(-1, inputs.shape[-1])
    if inputs.dim() == layer.weight.dim() - 1:  # unbatched
        inputs = inputs.unsqueeze(0)
    if convolution_dims(layer) == 1:
        inputs = inputs.unsqueeze(2)
        geometry = [(1, layer.kernel_size[0]), (1, layer.dilation[0]), (0, layer.padding[0]),
                    (1, layer.stride[0])]
    else:
        geometry = [layer.kernel_size, layer.dilation, layer.padding, layer.stride]
    patches = nn.functional.unfold(inputs, *geometry)  # (N, in * kernel, positions)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


class _Stop(Exception):
    """Raised by a hook once the wanted input is captured: the rest of the forward is not needed."""


def paired_moments(original: nn.Module, compressed: nn.Module, name: str, data, forward_fn=None,
                   max_batches: int | None = None) -> PairedMoments:
    """:class:`PairedMoments` of layer ``name`` of ``original`` and ``compressed`` on ``data``.

    Both models run each batch in eval mode without gradients, each stopped as soon as the
    layer's input is captured (its first call in the forward), under the batch's token mask.
    """
    layer = original.get_submodule(name)
    moments = PairedMoments.zeros(kind_of(layer).weight(layer)[0].numel(), layer.bias is not None,
                                  model_device(original))
    modes = (original.training, compressed.training)
    original.eval(), compressed.eval()
    try:
        with torch.no_grad():
            for index, batch in enumerate(as_batches(data)):
                if max_batches is not None and index >= max_batches:
                    break
                batch = move_to(batch, model_device(original))
                rows = [input_rows(layer, *_layer_input(model, name, batch, forward_fn))
                        for model in (original, compressed)]
                moments.update(*rows)
    finally:
        original.train(modes[0]), compressed.train(modes[1])
    return moments


def _layer_input(model: nn.Module, name: str, batch, forward_fn) -> tuple[torch.Tensor, TokenMask | None]:
    """The first input of layer ``name`` on ``batch`` and the token mask active at that call."""
    captured = []

    def hook(module, args):
        captured.append((args[0].detach(), active_mask()))
        raise _Stop

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        forward(model, batch, forward_fn)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"data: layer {name!r} was not called by the model's forward; it cannot be "
                         "corrected.")
    return captured[0]


def corrected_layer(layer: nn.Module, moments: PairedMoments, ridge: float) -> nn.Module:
    """A copy of ``layer`` with ``W' = W + D`` and ``b' = b + e`` (see the module docstring), ``W``
    as its kind reads it (:meth:`rankwise.kinds.LayerKind.weight`)."""
    kind = kind_of(layer)
    weight = kind.weight(layer).detach().to(torch.float64)
    flat = weight.reshape(len(weight), -1)
    dim = len(moments.gram)
    level = float(moments.gram.trace()) / dim
    regularised = moments.gram + ridge * max(level, torch.finfo(torch.float64).tiny) * torch.eye(
        dim, dtype=torch.float64, device=moments.gram.device)
    correction = torch.linalg.solve(regularised, (flat @ moments.cross).T).T  # W C (G + l I)^-1
    corrected = copy.deepcopy(layer)
    with torch.no_grad():
        refitted = (flat + correction[:, :flat.shape[1]]).reshape(weight.shape)
        corrected.weight.copy_(kind.stored(refitted).to(layer.weight.dtype))
        if layer.bias is not None:
            corrected.bias.copy_((layer.bias.detach().to(torch.float64) + correction[:, -1]).to(layer.bias.dtype))
    return corrected


def execution_order(model: nn.Module, names, batch, forward_fn=None) -> list[str]:
    """``names`` in the order of their first call when ``model`` runs ``batch`` (those never
    called last, in the given order)."""
    order: list[str] = []
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: order.append(name) if name not in order else None)
        for name in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            (forward_fn or default_forward)(model, move_to(batch, model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return order + [name for name in names if name not in order]


def build_sequentially(model: nn.Module, layers: dict, options: dict, choices: dict, data, *,
                       forward_fn=None, ridge: float = RIDGE, unpack: bool = False,
                       inplace: bool = False, progress: str | None = None) -> nn.Module:
    """The projected network of ``choices``, each layer corrected before it is projected.

    In the order the forward calls them, each layer to project is replaced by its
    :func:`corrected_layer` (fitted on the compressed network built so far), analysed again on
    the compressed network's inputs (one :class:`~rankwise.NeuronPCA` pass for that layer,
    whitened in the layer's metric as its ``options`` were), and projected at its chosen side
    and ranks. Layers :func:`correctable` does not cover are projected as they are.

    Parameters
    ----------
    model : torch.nn.Module
        The original network; with ``inplace=False`` it is not modified.
    layers : dict of str to torch.nn.Module
        Its dense layers decided on.
    options : dict of str to LayerOptions
        Their options on the original statistics (their metrics are reused).
    choices : dict of str to RankChoice
        The decisions.
    data : iterable
        Calibration batches.
    forward_fn : callable, optional
    ridge : float
        The ridge of :func:`corrected_layer`, relative to the mean eigenvalue of ``E[z z^T]``.
    unpack, inplace : bool
        As for :func:`~rankwise.compress_network_using_projection`.
    progress : str, optional
        Label of a progress bar over the layers.

    Returns
    -------
    torch.nn.Module
    """
    reference = copy.deepcopy(model) if inplace else model
    compressed = model if inplace else copy.deepcopy(model)
    projected = [name for name, choice in choices.items() if choice.side != "dense"]
    first = next(iter(as_batches(data)))
    for name in tqdm(execution_order(reference, projected, first, forward_fn), desc=progress,
                     disable=progress is None):
        layer, metric = layers[name], options[name].metric
        if not correctable(layer):
            compressed.set_submodule(name, project_layer(layer, options[name], choices[name], unpack))
            continue
        corrected = corrected_layer(layer, paired_moments(reference, compressed, name, data, forward_fn), ridge)
        compressed.set_submodule(name, corrected)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ThinDataWarning)  # said once, by the first NeuronPCA
            npca = NeuronPCA(compressed, data, layer_names=[name], verbosity="off", forward_fn=forward_fn,
                             loss_fn=None, validation=None)
        analysed = npca.whitened({name: metric}, {name: corrected}) if metric is not None else npca
        refitted = layer_options(analysed, name)
        refitted.metric = metric
        compressed.set_submodule(name, project_layer(corrected, refitted, choices[name], unpack))
    return fused_paths_off(compressed)


def correction_batches(correction, correction_data, npca_or_data):
    """The batches of the sequential correction (``None`` without one), or a ValueError."""
    if correction not in (None, "sequential"):
        raise ValueError(f"correction: expected None or 'sequential', got {correction!r}.")
    if correction is None:
        if correction_data is not None:
            raise ValueError("correction_data: it is only used with correction='sequential'.")
        return None
    if correction_data is None and isinstance(npca_or_data, NeuronPCA):
        raise ValueError("correction_data: correction='sequential' refits each layer on calibration "
                         "data, which a NeuronPCA does not keep; pass the batches as correction_data "
                         "(or pass data instead of the NeuronPCA).")
    return npca_or_data if correction_data is None else correction_data
