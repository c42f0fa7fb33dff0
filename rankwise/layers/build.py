"""Build one layer's projected form from an explicit decision.

The decision is a :class:`~rankwise.ranks.RankChoice` (side and ranks) read against the
layer's :class:`~rankwise.ranks.LayerOptions` (its ranked bases and means): rank ``r`` of a
side uses the first ``r`` columns of that side's basis, ``Q_r = Q[:, :r]``, and the wrapper of
the layer's row of :data:`rankwise.kinds.KINDS` builds the module. For a recurrent layer the
bases are per cell (stacked layer and direction) and the ranks tuples over its cells.
"""

from __future__ import annotations

import dataclasses

from torch import nn

import rankwise.layers
from rankwise.kinds import kind_of
from rankwise.layers.base import ProjectedLayer
from rankwise.layers.tied import TiedEmbedding
from rankwise.metric import unwhiten_output, whitened_layer


def project_layer(layer: nn.Module, options, choice, unpack: bool = False) -> nn.Module:
    """The projected form of the dense ``layer`` at ``choice``.

    Parameters
    ----------
    layer : torch.nn.Module
        A dense layer of a supported kind.
    options : LayerOptions
        Its options (bases ``Q`` and means), from :func:`rankwise.ranks.layer_options`.
    choice : RankChoice
        A projected option of ``options`` (not ``"dense"``).
    unpack : bool
        Return plain torch layers (:meth:`ProjectedLayer.unpack`) instead of the wrapper.

    Returns
    -------
    torch.nn.Module
    """
    if _tied_head(options) is not None:  # the table end of a tied pair (rankwise.layers.tied)
        return TiedEmbedding.from_dense(layer, options.output_basis[:, :choice.rank_out], options.head)
    kind = kind_of(layer)
    wrapper: type[ProjectedLayer] = (kind.wrapper if isinstance(kind.wrapper, type)
                                     else getattr(rankwise.layers, kind.wrapper))
    metric = getattr(options, "metric", None)
    if metric is not None:  # the bases are those of the whitened layer R W: build it, then undo R
        projected = unwhiten_output(project_layer(whitened_layer(layer, metric), _unmeasured(options), choice),
                                    metric)
    elif kind.traits.per_part:  # bases per cell of a recurrence, per part of an attention
        projected = wrapper.from_dense(layer, input_basis=_cell_bases(choice.rank_in, options, options.input_basis),
                                       input_mean=options.input_mean,
                                       output_basis=_cell_bases(choice.rank_out, options, options.output_basis),
                                       output_mean=options.output_mean)
    else:
        projected = wrapper.from_dense(
            layer, input_basis=_leading(options.input_basis, choice.rank_in), input_mean=options.input_mean,
            output_basis=_leading(options.output_basis, choice.rank_out), output_mean=options.output_mean)
    return projected.unpack() if unpack else projected


def projected_modules(model: nn.Module, name: str, layer: nn.Module, options, choice,
                      unpack: bool = False) -> dict[str, nn.Module]:
    """``{name: project_layer(...)}``, and for a tied pair (:class:`~rankwise.ranks.options.TiedOptions`)
    also ``{head: its head end}``, sharing the table end's parameters (with a copy of the head's bias)."""
    projected = project_layer(layer, options, choice, unpack)
    if _tied_head(options) is None:
        return {name: projected}
    head = model.get_submodule(options.head)
    bias = None if head.bias is None else nn.Parameter(head.bias.detach().clone(), head.bias.requires_grad)
    return {name: projected, options.head: projected.head_end(bias, name)}


def _tied_head(options) -> str | None:
    """The head a tied pair's options name (``TiedOptions.head``), ``None`` for any other layer's."""
    return getattr(options, "head", None) or None


def _unmeasured(options):
    """``options`` without their metric (to build the whitened layer itself)."""
    return dataclasses.replace(options, metric=None)


def _leading(basis, rank):
    """``Q[:, :rank]``, or ``None`` for a side not projected (``rank`` is ``None``)."""
    return None if rank is None else basis[:, :rank]


def _cell_bases(ranks, options, per_cell: dict) -> dict:
    """``{cell: Q_cell[:, :rank_cell]}`` over the cells whose side is projected."""
    ranks = ranks if isinstance(ranks, tuple) else (ranks,)
    return {cell: per_cell[cell][:, :rank] for cell, rank in zip(options.cells, ranks) if rank is not None}
