"""ProjectedEmbedding: ``nn.Embedding`` as a table of ``r`` columns followed by ``Linear(r, d)``.

An embedding table ``E`` (``V x d``) is the ``Linear`` layer ``W = E^T`` on one-hot tokens
(:mod:`rankwise.statistics.embedding`), so its output projection is that of
:class:`~rankwise.layers.base.ProjectedLayer`: with ``P`` (``d x r``) the leading principal
directions of the looked-up embeddings and ``mu`` their mean,

    E[t] ~ mu + P P^T (E[t] - mu) = (E P)[t] P^T + (mu - P P^T mu),

a table ``E P`` of ``V x r`` (the core, an ``nn.Embedding`` with the original's
``padding_idx``) followed by ``Linear(r, d)`` with weight ``P`` and bias ``(I - P P^T) mu``:
``V r + d (r + 1)`` learnables instead of ``V d``. At ``r = d`` it reproduces the table
exactly. A padding row of zeros stays zero in the core, so padding tokens map to the bias.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.layers.base import ProjectedLayer, _as_basis, _as_vector, fill


class ProjectedEmbedding(ProjectedLayer):
    """A projected ``nn.Embedding``; output projection only (see the module docstring)."""

    @staticmethod
    def _width(module: nn.Module, end: str) -> int:
        return module.in_features  # the output projection's input: the rank

    @classmethod
    def from_dense(cls, layer: nn.Embedding, input_basis=None, input_mean=None,
                   output_basis=None, output_mean=None) -> "ProjectedEmbedding":
        """Project the table ``layer`` onto ``output_basis`` ``P`` (``d x r``) around ``output_mean``.

        ``input_basis`` / ``input_mean`` must be ``None``: the input of a table is a token,
        which has no principal directions to keep.
        """
        if input_basis is not None or output_basis is None:
            raise ValueError("from_dense: an embedding is projected on its output side only; give "
                             "output_basis and no input_basis.")
        table = layer.weight.detach().to(torch.float64)
        p = _as_basis(output_basis, table.shape[1], "output_basis", table)
        mu = _as_vector(output_mean, table.shape[1], "output_mean", table)
        dtype = layer.weight.dtype
        core = nn.Embedding(table.shape[0], p.shape[1], padding_idx=layer.padding_idx,
                            scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse,
                            device=table.device, dtype=dtype)
        with torch.no_grad():
            core.weight.copy_((table @ p).to(dtype))
        core.requires_grad_(layer.weight.requires_grad)
        out_proj = nn.Linear(p.shape[1], table.shape[1], device=table.device, dtype=dtype)
        fill(out_proj, p.to(dtype), (mu - p @ (p.T @ mu)).to(dtype), layer)
        return cls(None, core, out_proj)

    @classmethod
    def from_spec(cls, layer: nn.Embedding, spec: dict) -> "ProjectedEmbedding":
        """A wrapper of the structure ``spec`` describes for the table ``layer`` (placeholder
        weights: the first ``rank_out`` columns of the identity as ``P``)."""
        cls.check_spec_type(spec)
        basis = torch.eye(layer.weight.shape[1], dtype=torch.float64)[:, :spec["rank_out"]]
        return cls.from_dense(layer, output_basis=basis)
