"""Low-rank corrections of a compressed network's factors, trained, then merged back.

Like LoRA (Hu et al., 2021) and SVD-LLM's sequential LoRA, only a small correction of each factor
is trained: a factor weight ``W`` (``out x in``, a convolution's kernel read as
``out x (in/groups * kernel)``) runs as

    W + B A,    A (k x in),  B (out x k),  k = min(rank, out, in),

with ``A`` random (entries of RMS ``1/sqrt(in)``) and ``B = 0``, so that training starts from
the compressed network exactly. The factor's own weight and bias are frozen. Afterwards
:func:`merge_corrections` writes ``W + B A`` into the factor's weight and removes ``A`` and ``B``:
the same structure and the same learnable count as before, computing the same outputs.

The corrections are torch parametrizations (``torch.nn.utils.parametrize``), so any layer with a
``weight`` of two or more dimensions inside a compressed form (the ``Linear`` and convolution
factors of a projected layer, an embedding's factors) takes one without a new layer class.

Sequential (SVD-LLM's order): the corrections of each form's last factor (its output side: the
output projection, or the core when the output side is not projected) are trained and merged
first, then those of its other factors.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from rankwise.forms import compressed_forms

DEFAULT_LORA_RANK = 8


class LowRankCorrection(nn.Module):
    """The parametrization ``W -> W + B A`` (see the module docstring).

    Parameters
    ----------
    weight : torch.Tensor
        The factor's weight, ``(out, ...)``.
    rank : int
        The largest ``k``.
    generator : torch.Generator, optional
        Draws ``A``.
    """

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        out_dim, in_dim = weight.shape[0], weight[0].numel()
        k = min(rank, out_dim, in_dim)
        down = torch.randn(k, in_dim, generator=generator, dtype=torch.float32) / math.sqrt(in_dim)
        self.down = nn.Parameter(down.to(weight.device, weight.dtype))
        self.up = nn.Parameter(torch.zeros(out_dim, k, device=weight.device, dtype=weight.dtype))
        self.weight_rms = float(weight.detach().float().square().mean().sqrt()) or 1.0 / math.sqrt(in_dim)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.up @ self.down).view_as(weight)

    def lr_scales(self) -> dict:
        """The scale the learning-rate rule multiplies for each correction tensor: about one step
        changes ``W`` by ``relative lr x RMS(W)`` (``A``'s own RMS for ``A``; for ``B``,
        ``RMS(W) sqrt(in / k)``, as ``B A`` sums ``k`` products of RMS ``1/sqrt(in)``)."""
        in_dim, k = self.down.shape[1], self.down.shape[0]
        return {self.down: 1.0 / math.sqrt(in_dim), self.up: self.weight_rms * math.sqrt(in_dim / k)}


def factor_groups(model: nn.Module, sequential: bool = True) -> list[list[nn.Module]]:
    """The factors that take a correction, in the order they are trained: with ``sequential``,
    ``[last factors of every form, the other factors]``, else one group of all of them."""
    last, others = [], []
    for form in compressed_forms(model).values():
        factors = [m for m in form.modules() if _correctable(m)]
        if factors:
            last.append(factors[-1])
            others.extend(factors[:-1])
    if not last:
        raise ValueError("compressed: it has no compressed layer with factor weights to correct; "
                         "use method='logits' for a model compressed otherwise.")
    groups = [last, others] if sequential else [last + others]
    return [g for g in groups if g]


def _correctable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() >= 2 and not parametrize.is_parametrized(module)


def attach_corrections(factors: list[nn.Module], rank: int, seed: int = 0) -> dict:
    """Freeze ``factors`` and give each weight a :class:`LowRankCorrection`.

    Returns ``{correction tensor: lr scale}`` (the trainable tensors) and remembers each
    factor's ``requires_grad`` flags for :func:`merge_corrections`.
    """
    generator = torch.Generator().manual_seed(seed)
    scales = {}
    for factor in factors:
        factor._rankwise_requires_grad = {n: p.requires_grad for n, p in factor.named_parameters(recurse=False)}
        correction = LowRankCorrection(factor.weight, rank, generator)
        factor.requires_grad_(False)
        parametrize.register_parametrization(factor, "weight", correction)
        scales.update(correction.lr_scales())
    return scales


def merge_corrections(factors: list[nn.Module], keep: bool = True) -> None:
    """Write each factor's corrected weight ``W + B A`` into it (``keep=False``: drop the
    corrections, ``W`` unchanged) and remove the parametrization; trainability restored."""
    for factor in factors:
        if not parametrize.is_parametrized(factor, "weight"):
            continue
        parametrize.remove_parametrizations(factor, "weight", leave_parametrized=keep)
        flags = getattr(factor, "_rankwise_requires_grad", None)
        if flags is not None:
            for name, parameter in factor.named_parameters(recurse=False):
                parameter.requires_grad_(flags.get(name, True))
            del factor._rankwise_requires_grad
