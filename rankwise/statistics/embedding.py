"""Statistics of an embedding table, seen as a ``Linear`` layer on one-hot tokens.

An ``nn.Embedding`` with table ``E`` (``V x d``) maps token ``t`` to ``y = E[t] = W e_t`` with
``W = E^T`` (``d x V``) and ``e_t`` the one-hot vector of the token: a ``Linear`` layer without
bias whose inputs are one-hot. Its statistics are therefore those of
:class:`~rankwise.statistics.dense.LayerStatistics` with

- output moments over every looked-up token (one row per token position; with a token mask,
  per real token only, and a table looked up once for the whole batch, as BERT's position
  embeddings are, counts once per sequence that reaches the position: :mod:`rankwise.masks`);
- input moments of the one-hot rows, kept without their ``V x V`` outer product (as for every
  ``Linear``): ``count = n``, ``sum = `` the token counts, ``square_sum = n`` (each one-hot row
  has norm 1), gathered with a ``bincount`` instead of materialising the rows;
- ``W W^T = E^T E``, the Gram of the whole table.

So the thin-data shrinkage of :mod:`rankwise.statistics.spectra` pulls the output covariance
toward ``s E^T E`` with ``s = tr(C_x) / V = (1 - sum_t p_t^2) / V ~ 1 / V``: the covariance of a
token drawn uniformly from the whole vocabulary. Directions of tokens that calibration never
showed keep that prior weight, which is what makes a projected table robust for them.

A table tied to an output head (:mod:`rankwise.ties`) also gathers the moments of the head's
input rows ``x`` (``head_input``, with their outer products, ``d x d``): the tied pair's options
judge the head's logits ``E x`` through them (:mod:`rankwise.ranks.tied`). ``head`` is the
head's qualified name (``None`` for a table that is not tied).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.masks import active_mask, token_rows
from rankwise.moments import Moments, naming_layer
from rankwise.statistics.dense import LayerStatistics, add_call


@dataclass
class EmbeddingStatistics(LayerStatistics):
    """:class:`LayerStatistics` of ``W = E^T`` on one-hot inputs, and of a tied head's input
    (see the module docstring)."""

    head: str | None = None
    head_input: Moments | None = None

    @classmethod
    def for_layer(cls, layer: nn.Embedding, kind: str) -> "EmbeddingStatistics":
        table = layer.weight.detach()
        vocabulary, dim = table.shape
        return cls(kind, vocabulary, dim, 1, False, Moments.zeros(vocabulary, table.device, outer=False),
                   Moments.zeros(dim, table.device), None, None, table.T.clone())  # E^T E on first use

    def hook(self, name: str, layer: nn.Module):
        """A forward hook adding the looked-up tokens (input) and their embeddings (output)."""
        def hook(module, args, kwargs, output):
            mask = active_mask()
            tokens = token_rows((args[0] if args else next(iter(kwargs.values())))[..., None], mask).reshape(-1)
            counts = torch.bincount(tokens, minlength=self.in_channels).to(torch.float64)
            self.input.count += len(tokens)
            self.input.sum += counts
            self.input.square_sum += len(tokens)
            with naming_layer(name, "output activations"):
                add_call(self.output, output.detach(), layer, shared=False)  # small calls buffered

        return hook

    def tied_to(self, head: str, layer: nn.Linear) -> "EmbeddingStatistics":
        """These statistics also gathering the input of the tied head ``layer``, called ``head``."""
        return dataclasses.replace(self, head=head, head_input=Moments.zeros(layer.in_features, layer.weight.device))

    def head_hook(self, head: str):
        """A forward hook on the tied head adding its input rows to ``head_input``."""
        def hook(module, args, kwargs, output):
            with naming_layer(head, "input activations"):
                add_call(self.head_input, (args[0] if args else next(iter(kwargs.values()))).detach(), module,
                         shared=False)

        return hook

    def __add__(self, other: "EmbeddingStatistics") -> "EmbeddingStatistics":
        if self.head != other.head:
            raise ValueError("the two statistics describe tables tied to different heads")
        total = super().__add__(other)
        head_input = None if self.head_input is None else self.head_input + other.head_input
        return EmbeddingStatistics(**{**vars(total), "head_input": head_input})
