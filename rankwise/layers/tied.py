"""One factored table serving both ends of a tie: ``TiedEmbedding`` (lookup) and ``TiedHead`` (logits).

A token table ``E`` (``V x d``) tied to an output head (:mod:`rankwise.ties`) is replaced by
``E ~ A B`` with ``A = E P`` (``V x r``) and ``B = P^T`` (``r x d``), ``P`` an orthonormal
``d x r`` basis (:mod:`rankwise.ranks.tied` chooses it):

- the lookup ``e_t = E[t]`` becomes ``A[t] B = E[t] P P^T``  (:class:`TiedEmbedding`);
- the head ``z = E x + b`` becomes ``A (B x) + b = E P P^T x + b``  (:class:`TiedHead`).

Both modules hold the **same** two parameters ``A`` (``table``) and ``B`` (``basis``), so the
tie is kept: ``V r + r d`` learnables instead of ``V d``, counted once, trained once, saved once
(:func:`rankwise.save` stores a tensor two modules hold once, and :func:`rankwise.load` makes
both hold it again). With ``r = d`` and ``P`` square, ``P P^T = I``: both ends are exact.
A padding row of zeros stays zero (``A[pad] = E[pad] P``).

No plain torch layers compute the pair factored with one copy of ``B`` (the lookup reads ``B``,
the head ``B^T``), so :meth:`unpack` returns the form itself and :meth:`to_dense` the dense layer
with ``A B`` (an untied copy, for an exporter).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rankwise.forms import CompressedForm


class TiedEmbedding(CompressedForm, nn.Module):
    """The lookup end: ``e_t = A[t] B`` (see the module docstring).

    Parameters
    ----------
    table : torch.nn.Parameter
        ``A``, ``(V, r)``.
    basis : torch.nn.Parameter
        ``B``, ``(r, d)``.
    head : str
        The qualified name of the tied head (for the spec and messages).
    padding_idx, scale_grad_by_freq, sparse :
        As the original ``nn.Embedding``'s.
    """

    def __init__(self, table: nn.Parameter, basis: nn.Parameter, head: str, padding_idx=None,
                 scale_grad_by_freq: bool = False, sparse: bool = False):
        super().__init__()
        self.table, self.basis, self.head = table, basis, head
        self.padding_idx, self.scale_grad_by_freq, self.sparse = padding_idx, scale_grad_by_freq, sparse

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens, self.table, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)
        return rows @ self.basis

    @classmethod
    def from_dense(cls, table: nn.Embedding, basis: torch.Tensor, head: str) -> "TiedEmbedding":
        """``A = E P``, ``B = P^T`` from the dense ``table`` and the orthonormal ``basis`` ``P`` (``d x r``)."""
        weight = table.weight.detach()
        p = basis.to(device=weight.device, dtype=torch.float64)
        if p.dim() != 2 or p.shape[0] != weight.shape[1]:
            raise ValueError(f"basis: expected a ({weight.shape[1]}, r) matrix, got {tuple(basis.shape)}.")
        grad = table.weight.requires_grad
        a = nn.Parameter((weight.to(torch.float64) @ p).to(weight.dtype), requires_grad=grad)
        b = nn.Parameter(p.T.contiguous().to(weight.dtype), requires_grad=grad)
        return cls(a, b, head, table.padding_idx, table.scale_grad_by_freq, table.sparse)

    def spec(self) -> dict:
        """``{"type", "rank_in": None, "rank_out": r, "head"}``: an output-side projection of rank ``r``."""
        return {"type": type(self).__name__, "rank_in": None, "rank_out": self.rank, "head": self.head}

    @classmethod
    def from_spec(cls, layer: nn.Embedding, spec: dict) -> "TiedEmbedding":
        """Placeholder weights of the structure ``spec`` describes, for the dense table ``layer``."""
        cls.check_spec_type(spec)
        return cls.from_dense(layer, torch.eye(layer.weight.shape[1], dtype=torch.float64)[:, :spec["rank_out"]],
                              spec["head"])

    def head_end(self, bias: nn.Parameter | None, table_name: str) -> "TiedHead":
        """The head end sharing this table's parameters, with the head's ``bias``; ``table_name`` is
        this table's qualified name."""
        return TiedHead(self.table, self.basis, bias, table_name)

    def unpack(self) -> nn.Module:
        return self  # no plain layers share B with the head (module docstring)

    def to_dense(self) -> nn.Embedding:
        """An ``nn.Embedding`` with the table ``A B``."""
        table = nn.Embedding(*self.table.shape[:1], self.basis.shape[1], padding_idx=self.padding_idx,
                             device=self.table.device, dtype=self.table.dtype)
        with torch.no_grad():
            table.weight.copy_(self.table @ self.basis)
        return table

    def extra_repr(self) -> str:
        return f"{self.table.shape[0]}, rank={self.rank}, {self.basis.shape[1]}, tied to {self.head!r}"


class TiedHead(CompressedForm, nn.Module):
    """The head end: ``z = A (B x) + b``, holding the parameters of its :class:`TiedEmbedding`."""

    def __init__(self, table: nn.Parameter, basis: nn.Parameter, bias: nn.Parameter | None, table_name: str):
        super().__init__()
        self.table, self.basis, self.bias, self.table_name = table, basis, bias, table_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.basis), self.table, self.bias)

    def spec(self) -> dict:
        """``{"type", "rank_in": None, "rank_out": r, "table"}``."""
        return {"type": type(self).__name__, "rank_in": None, "rank_out": self.basis.shape[0], "table": self.table_name}

    @classmethod
    def from_spec(cls, layer: nn.Linear, spec: dict) -> "TiedHead":
        """Placeholder weights of the structure ``spec`` describes, for the dense head ``layer``
        (:func:`rankwise.load` then makes it hold its table's parameters again)."""
        cls.check_spec_type(spec)
        vocabulary, width = layer.weight.shape
        like = dict(device=layer.weight.device, dtype=layer.weight.dtype)
        return cls(nn.Parameter(torch.zeros(vocabulary, spec["rank_out"], **like)),
                   nn.Parameter(torch.zeros(spec["rank_out"], width, **like)), layer.bias, spec["table"])

    def unpack(self) -> nn.Module:
        return self

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the weight ``A B`` and the head's bias."""
        head = nn.Linear(self.basis.shape[1], self.table.shape[0], bias=self.bias is not None,
                         device=self.table.device, dtype=self.table.dtype)
        with torch.no_grad():
            head.weight.copy_(self.table @ self.basis)
            if self.bias is not None:
                head.bias.copy_(self.bias)
        return head

    def extra_repr(self) -> str:
        return f"{self.basis.shape[1]}, rank={self.basis.shape[0]}, {self.table.shape[0]}, tied to {self.table_name!r}"
