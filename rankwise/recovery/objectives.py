"""What recovery trains toward: the original's outputs, or the original's layer outputs.

Output distillation (``method="logits"`` and ``"lora"``)
    For logits (``rankwise.statistics.gradients.output_loss`` says ``"kl"``: a ``.logits``
    output, or ``(N, C)`` scores of a labelled batch), the mean over rows (samples; tokens of a
    language model, padding left out) of

        T^2 KL(softmax(z / T) || softmax(z' / T)),

    ``z`` the original's and ``z'`` the compressed network's outputs; at ``T = 1`` the loss is
    the held-out score of :mod:`rankwise.divergence`, so what is trained is what is judged.
    For any other output, the relative squared error ``sum |z' - z|^2 / sum |z|^2``.

Feature distillation (``method="features"``)
    Each compressed layer ``l`` (an outermost compressed form) learns to reproduce the original
    layer's output ``y_l`` from the compressed network's own input to it, which is detached so
    that layer ``l`` learns only from its own error (block-wise, local targets; every position
    of every sample is a target, no labels). With per-channel weights ``w_c`` the loss is

        L = (1 / n_layers) sum_l  sum_c w_c sum_rows (y'_lc - y_lc)^2 / sum_c w_c sum_rows (y_lc - ybar_lc)^2,

    a relative error per layer, so layers of any scale count alike. ``w_c = (gamma_c / sigma_c)^2``
    of the BatchNorm that follows the layer (the error as the network sees it after the
    normalisation, :mod:`rankwise.metric`), ``w_c = 1`` without one.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.batches import forward, move_to
from rankwise.divergence import output_tensor
from rankwise.forms import compressed_forms
from rankwise.kinds import channels_last, kind_of
from rankwise.metric import batchnorm_scale, following_batchnorms
from rankwise.statistics.gradients import output_loss


def output_rows(outputs, batch) -> torch.Tensor:
    """The output's rows ``(rows, last dim)`` without the padding positions of a dict batch's
    ``attention_mask``."""
    tensor = output_tensor(outputs)
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is not None and tensor.dim() >= 2 and tuple(tensor.shape[:2]) == tuple(mask.shape):
        tensor = tensor[mask.to(tensor.device).bool()]
    return tensor.reshape(-1, tensor.shape[-1] if tensor.dim() else 1)


def output_divergence(compressed_outputs, original_outputs, batch, kind: str,
                      temperature: float = 1.0) -> torch.Tensor:
    """The output distillation loss of the module docstring (``kind``: ``"kl"`` or ``"mse"``)."""
    student, teacher = output_rows(compressed_outputs, batch), output_rows(original_outputs, batch).detach()
    if kind != "kl":
        return (student - teacher).square().sum() / teacher.square().sum().clamp_min(1e-12)
    teacher = (teacher.float() / temperature).log_softmax(-1)
    student = (student.float() / temperature).log_softmax(-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1).mean()
    return temperature ** 2 * kl


class OutputDistillation:
    """``objective(model, batch) -> loss``: output distillation from ``original``.

    ``kind`` (``"kl"`` or ``"mse"``) follows the held-out score when that is ``"kl"`` or
    ``"relative_error"``; ``None`` reads it from the first batch (``output_loss``)."""

    def __init__(self, original: nn.Module, forward_fn=None, temperature: float = 1.0, kind: str | None = None):
        self.original, self.forward_fn, self.temperature = original, forward_fn, temperature
        self.kind = kind

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        with torch.no_grad():
            target = forward(self.original, batch, self.forward_fn)
        if self.kind is None:
            self.kind = output_loss(target, batch)
        return output_divergence(forward(model, batch, self.forward_fn), target, batch, self.kind,
                                 self.temperature)

    def close(self) -> None:
        """Nothing to release (the same interface as :class:`FeatureDistillation`)."""


def feature_layers(compressed: nn.Module, original: nn.Module) -> list[str]:
    """The outermost compressed forms of ``compressed`` whose name is a module of ``original``.

    Raises
    ------
    ValueError
        When ``compressed`` has no compressed form, or one has no counterpart in ``original``.
    """
    names = [n for n in compressed_forms(compressed) if n]
    if not names:
        raise ValueError("compressed: it has no compressed layer (ProjectedLayer or another form) whose "
                         "output could be distilled; use method='logits' for a model compressed otherwise.")
    originals = dict(original.named_modules())
    missing = [n for n in names if n not in originals]
    if missing:
        raise ValueError(f"original: it has no module {', '.join(missing[:3])} matching the compressed "
                         "layers; pass the network that was compressed (the same module names).")
    return names


class FeatureDistillation:
    """``objective(model, batch) -> loss``: the feature distillation of the module docstring.

    Hooks on ``original`` and ``compressed`` capture the layers' outputs (and detach the compressed
    layers' inputs) while the objective runs; :meth:`close` removes them.
    """

    def __init__(self, original: nn.Module, compressed: nn.Module, forward_fn=None):
        self.original, self.forward_fn = original, forward_fn
        self.names = feature_layers(compressed, original)
        self.targets, self.outputs, self.handles = {}, {}, []
        norms = following_batchnorms(original, {n: original.get_submodule(n) for n in self.names
                                                if kind_of(original.get_submodule(n)) is not None})
        self.weights = {n: batchnorm_scale(norms[n]).detach().square() if n in norms else None
                        for n in self.names}
        self.last_axis = {n: _channels_last(original.get_submodule(n)) for n in self.names}
        for name in self.names:
            self.handles.append(original.get_submodule(name).register_forward_hook(self._keep(self.targets, name)))
            layer = compressed.get_submodule(name)
            self.handles.append(layer.register_forward_pre_hook(_detach_inputs))
            self.handles.append(layer.register_forward_hook(self._keep(self.outputs, name)))

    @staticmethod
    def _keep(store: dict, name: str):
        def hook(module, inputs, output):
            store[name] = output[0] if isinstance(output, tuple | list) else output
        return hook

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        self.targets.clear()
        self.outputs.clear()
        with torch.no_grad():
            forward(self.original, batch, self.forward_fn)
        forward(model, batch, self.forward_fn)
        losses = [self._layer_loss(n) for n in self.names if n in self.outputs and n in self.targets]
        if not losses:
            raise ValueError("data: no compressed layer ran on this batch; check forward_fn.")
        return torch.stack(losses).mean()

    def _layer_loss(self, name: str) -> torch.Tensor:
        output, target = self.outputs[name].float(), self.targets[name].detach().float()
        if not self.last_axis[name] and target.dim() > 1:
            output, target = output.movedim(1, -1), target.movedim(1, -1)
        error, target = (output - target).reshape(-1, target.shape[-1]), target.reshape(-1, target.shape[-1])
        spread = (target - target.mean(0)).square()
        weight = self.weights[name]
        if weight is not None and weight.numel() == target.shape[-1]:
            weight = weight.to(target.device, target.dtype)
            return (error.square() * weight).sum() / (spread * weight).sum().clamp_min(1e-12)
        return error.square().sum() / spread.sum().clamp_min(1e-12)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _detach_inputs(module, inputs):
    return tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in inputs)


def _channels_last(layer: nn.Module) -> bool:
    kind = kind_of(layer)
    try:
        return kind is None or channels_last(layer)
    except (AttributeError, TypeError):
        return True


def on_device(batch, model: nn.Module):
    """``batch`` on ``model``'s device."""
    return move_to(batch, next(model.parameters()).device)
