"""ProjectedLayer: a dense layer replaced by smaller layers acting in a subspace.

A projected layer computes ``out_proj(core(in_proj(x)))``:

- ``in_proj`` (optional) maps the ``in`` input channels onto ``rank_in`` principal
  directions ``Q`` of the layer's input: weight ``Q^T``, no bias;
- ``core`` has the original layer's kernel, stride, padding and dilation;
- ``out_proj`` (optional) maps ``rank_out`` channels back to the ``out`` output channels:
  weight ``P`` (the principal directions of the layer's output) and the bias.

For a dense layer ``y = W x + b`` with input mean ``mu_x`` and output mean ``mu_y``:

- output projection: ``y ~ mu_y + P P^T (W x + b - mu_y)``: core weight ``P^T W`` without
  bias, output bias ``mu_y + P P^T (b - mu_y)``;
- input projection: ``y ~ W Q Q^T x + b + W (I - Q Q^T) mu_x``: core weight ``W Q``, core bias
  ``b + W (I - Q Q^T) mu_x``;
- both sides: core weight ``P^T W Q``, output bias ``mu_y + P P^T (b + W (I - Q Q^T) mu_x - mu_y)``.

For convolutions the products act on the channel legs of the kernel and ``W mu`` sums the
kernel over its spatial positions (exact away from zero padding). With ``Q`` and ``P`` full
orthonormal bases, every form reproduces the dense layer exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from rankwise.forms import SPEC_ATTRIBUTE, CompressedForm
from rankwise.kinds import kind_of


class ProjectedLayer(CompressedForm, nn.Module):
    """Base class of every projected wrapper: ``out_proj(core(in_proj(x)))``.

    When every part is a plain ``nn.Linear`` (and no module hook is registered globally),
    :meth:`forward` runs ``F.linear`` on the parts' weights instead of calling the parts: the
    same products without two or three module calls of a few microseconds each, which at batch 1
    cost more than the products (``bench/wrapper_overhead.py``: at batch 1 a 128 -> 16 -> 128
    factored Linear took 13.6 us calling its parts, 10.0 us with this path, 11.4 us as the unpacked
    ``nn.Sequential``; the dense layer 6.5 us). Hooks registered on a part itself (not on the
    wrapper) are then not called; a part with a parametrized weight (``rw.recover``'s LoRA) is
    not a plain ``nn.Linear`` and is called as a module.

    Parameters
    ----------
    in_proj : torch.nn.Module or None
        Input projection (``in -> rank_in``), absent when the input side is not projected.
    core : torch.nn.Module
        The layer acting between the projections.
    out_proj : torch.nn.Module or None
        Output projection (``rank_out -> out``), absent when the output side is not projected.
    """

    def __init__(self, in_proj: nn.Module | None, core: nn.Module, out_proj: nn.Module | None):
        super().__init__()
        self.in_proj = in_proj
        self.core = core
        self.out_proj = out_proj

    @property
    def side(self) -> str:
        """Which sides are projected: ``"input"``, ``"output"`` or ``"both"``."""
        if self.in_proj is not None and self.out_proj is not None:
            return "both"
        return "input" if self.in_proj is not None else "output"

    @property
    def rank_in(self) -> int | None:
        """Width of the input projection, ``None`` when the input side is not projected."""
        return None if self.in_proj is None else self._width(self.in_proj, "out")

    @property
    def rank_out(self) -> int | None:
        """Width of the output projection, ``None`` when the output side is not projected."""
        return None if self.out_proj is None else self._width(self.out_proj, "in")

    @staticmethod
    def _width(module: nn.Module, end: str) -> int:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = self._modules  # read once: nn.Module's attribute lookup costs a call
        parts = [part for part in (modules.get("in_proj"), modules["core"], modules.get("out_proj")) if part is not None]
        if all(type(part) is nn.Linear for part in parts) and not global_hooks_registered():
            for part in parts:  # the products alone (see the class docstring)
                x = F.linear(x, part.weight, part.bias)
            return x
        for part in parts:
            x = part(x)
        return x

    def unpack(self) -> nn.Sequential:
        """The same computation as a ``torch.nn.Sequential`` of plain torch layers.

        The returned layers share their parameters with this wrapper. The ``nn.Sequential``
        carries this wrapper's :meth:`spec` as its attribute ``rankwise_spec`` (a plain dict),
        so that :func:`rankwise.save` can describe it; a subclass that overrides ``unpack``
        sets it too.
        """
        unpacked = nn.Sequential(*(m for m in (self.in_proj, self.core, self.out_proj) if m is not None))
        setattr(unpacked, SPEC_ATTRIBUTE, self.spec())
        return unpacked

    def extra_repr(self) -> str:
        return f"side={self.side}, rank_in={self.rank_in}, rank_out={self.rank_out}"

    def spec(self) -> dict:
        """A plain description of this wrapper: its class name and ranks (JSON-friendly).

        With the original dense layer, :meth:`from_spec` rebuilds a wrapper of the same
        structure, ready for ``load_state_dict``.
        """
        return {"type": type(self).__name__, "rank_in": self.rank_in, "rank_out": self.rank_out}

    @classmethod
    def from_spec(cls, layer: nn.Module, spec: dict) -> "ProjectedLayer":
        """A wrapper with the structure described by ``spec`` (see :meth:`spec`) for ``layer``.

        Its weights are placeholders (the first columns of the identity as bases): load the
        saved state dict into it.
        """
        cls.check_spec_type(spec)
        out_channels, in_channels = kind_of(layer).weight(layer).shape[:2]

        def leading_columns(dim, rank):
            return None if rank is None else torch.eye(dim, dtype=torch.float64)[:, :rank]

        return cls.from_dense(layer, input_basis=leading_columns(in_channels, spec["rank_in"]),
                              output_basis=leading_columns(out_channels, spec["rank_out"]))

    # Construction ---------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, layer: nn.Module, input_basis=None, input_mean=None,
                   output_basis=None, output_mean=None) -> "ProjectedLayer":
        """Project a dense layer onto the given orthonormal bases.

        Parameters
        ----------
        layer : torch.nn.Module
            The dense layer (``nn.Linear`` for :class:`ProjectedLinear`, ``nn.ConvNd`` for
            :class:`ProjectedConv`, GPT-2's ``Conv1D`` for :class:`ProjectedConv1D`), its weight
            read as ``W`` by :meth:`rankwise.kinds.LayerKind.weight`. It is not modified.
        input_basis : torch.Tensor, optional
            ``Q`` of shape ``(in, rank_in)`` with orthonormal columns; projects the input side.
        input_mean : torch.Tensor, optional
            ``mu_x`` of shape ``(in,)``, folded into the core's bias. Zero when omitted.
        output_basis : torch.Tensor, optional
            ``P`` of shape ``(out, rank_out)`` with orthonormal columns; projects the output.
        output_mean : torch.Tensor, optional
            ``mu_y`` of shape ``(out,)``, the output projection's bias. Zero when omitted.

        Returns
        -------
        ProjectedLayer
        """
        if input_basis is None and output_basis is None:
            raise ValueError("from_dense: give input_basis, output_basis or both.")
        weight = kind_of(layer).weight(layer).detach().to(torch.float64)
        out_channels, in_channels = weight.shape[:2]
        bias = (torch.zeros(out_channels, dtype=torch.float64, device=weight.device)
                if layer.bias is None else layer.bias.detach().to(torch.float64))
        core_weight, core_bias = weight, bias
        in_weight = out_weight = out_bias = None
        if input_basis is not None:
            q = _as_basis(input_basis, in_channels, "input_basis", weight)
            mu_x = _as_vector(input_mean, in_channels, "input_mean", weight)
            residual_mean = mu_x - q @ (q.T @ mu_x)
            core_bias = core_bias + weight.reshape(out_channels, in_channels, -1).sum(2) @ residual_mean
            core_weight = torch.tensordot(core_weight, q, dims=([1], [0])).movedim(-1, 1)
            in_weight = q.T
        if output_basis is not None:
            p = _as_basis(output_basis, out_channels, "output_basis", weight)
            mu_y = _as_vector(output_mean, out_channels, "output_mean", weight)
            core_weight = torch.tensordot(p.T, core_weight, dims=([1], [0]))
            out_weight, out_bias = p, mu_y + p @ (p.T @ (core_bias - mu_y))
            core_bias = None
        dtype = layer.weight.dtype
        in_proj = None if in_weight is None else cls._pointwise(in_weight.to(dtype), None, layer)
        out_proj = None if out_weight is None else cls._pointwise(out_weight.to(dtype),
                                                                  out_bias.to(dtype), layer)
        core = cls._core(layer, core_weight.to(dtype), None if core_bias is None else core_bias.to(dtype))
        return cls(in_proj, core, out_proj)

    @classmethod
    def _pointwise(cls, weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module) -> nn.Module:
        """A channel-mixing layer ``(out, in)`` of the same family as ``like``."""
        raise NotImplementedError

    @classmethod
    def _core(cls, like: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        """A layer with ``like``'s hyperparameters and the given weight and (optional) bias."""
        raise NotImplementedError


def fill(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
         like: nn.Module) -> nn.Module:
    """Copy ``weight`` and ``bias`` into a new ``layer``, trainable like ``like``."""
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(like.weight.requires_grad)
    return layer


def _as_basis(basis, dim: int, argument: str, like: torch.Tensor) -> torch.Tensor:
    basis = torch.as_tensor(basis).to(dtype=torch.float64, device=like.device)
    if basis.dim() != 2 or basis.shape[0] != dim or not 1 <= basis.shape[1] <= dim:
        raise ValueError(f"{argument}: expected shape ({dim}, rank) with 1 <= rank <= {dim}, "
                         f"got {tuple(basis.shape)}.")
    return basis


def _as_vector(vector, dim: int, argument: str, like: torch.Tensor) -> torch.Tensor:
    if vector is None:
        return torch.zeros(dim, dtype=torch.float64, device=like.device)
    vector = torch.as_tensor(vector).to(dtype=torch.float64, device=like.device)
    if vector.shape != (dim,):
        raise ValueError(f"{argument}: expected shape ({dim},), got {tuple(vector.shape)}.")
    return vector


def global_hooks_registered() -> bool:
    """Whether any module hook is registered globally (``torch.nn.modules.module.register_module_*``,
    as the FLOP counter's module tracker does): every part's call must then be a module call."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)

