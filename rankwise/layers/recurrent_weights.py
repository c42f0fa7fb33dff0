"""The weights of a projected LSTM or GRU, projected cell by cell from the dense layer's.

For each side of each cell (:mod:`rankwise.layers.recurrent`: ``"input"`` feeds ``W_ih`` and
``b_ih``, ``"output"``, the hidden state, feeds ``W_hh`` and ``b_hh``) given an orthonormal basis
``Q`` and a mean ``mu``, the projected weight is ``W Q`` and the bias takes the constant
``W (I - Q Q^T) mu``; a side given no basis keeps ``W`` and ``b``. The products are computed in
float64 and stored in the dense layer's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.layers.base import _as_basis, _as_vector
from rankwise.rnn import cell_names

SIDE_PARAMETERS = {"input": ("weight_ih", "bias_ih"), "output": ("weight_hh", "bias_hh")}
"""The weight and bias each side of a cell feeds: ``"output"`` is the hidden state."""


def projected_parameters(layer: nn.Module, input_basis=None, input_mean=None, output_basis=None,
                         output_mean=None) -> tuple:
    """``(in_proj, core, out_proj)`` of :class:`~rankwise.layers.recurrent.ProjectedRecurrent` for
    ``layer`` projected onto the given bases.

    Parameters
    ----------
    layer, input_basis, input_mean, output_basis, output_mean
        As for :meth:`~rankwise.layers.recurrent.ProjectedRecurrent.from_dense`.

    Returns
    -------
    in_proj, out_proj : torch.nn.ParameterDict or None
        ``Q`` of each cell whose input (hidden-state) side is projected; ``None`` where none is.
    core : torch.nn.ParameterDict
        ``weight_ih_<cell>``, ``weight_hh_<cell>`` and, for a layer with biases,
        ``bias_ih_<cell>``, ``bias_hh_<cell>``, the means folded in.
    """
    cells = cell_names(layer.num_layers, layer.bidirectional)
    given = {side: (_per_cell(basis, cells, f"{side}_basis"), _per_cell(mean, cells, f"{side}_mean"))
             for side, basis, mean in (("input", input_basis, input_mean),
                                       ("output", output_basis, output_mean))}
    if not given["input"][0] and not given["output"][0]:
        raise ValueError("from_dense: give input_basis, output_basis or both.")
    projectors, core = {"input": {}, "output": {}}, {}
    for cell in cells:
        projected = {side: _project_side(layer, cell, side, *given[side], projectors[side])
                     for side in given}
        core.update({f"{SIDE_PARAMETERS[side][0]}_{cell}": projected[side][0] for side in given})
        if layer.bias:
            core.update({f"{SIDE_PARAMETERS[side][1]}_{cell}": projected[side][1] for side in given})
    like = layer.weight_ih_l0
    return (_parameters(projectors["input"], like), _parameters(core, like),
            _parameters(projectors["output"], like))


def _per_cell(value, cells: list[str], argument: str) -> dict:
    """``value`` as a dict keyed by cell (a tensor stands for the only cell of a one-cell layer)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(cells))
        if unknown:
            raise ValueError(f"{argument}: {', '.join(map(repr, unknown))} is not a cell of the layer "
                             f"(its cells: {', '.join(cells)}).")
        return {cell: v for cell, v in value.items() if v is not None}
    if len(cells) == 1:
        return {cells[0]: value}
    raise ValueError(f"{argument}: the layer has {len(cells)} cells ({', '.join(cells)}); give a dict "
                     "keyed by cell name.")


def _project_side(layer: nn.Module, cell: str, side: str, bases: dict, means: dict, projectors: dict):
    """``(W Q, b + W (I - Q Q^T) mu)`` of one side of one cell, float64 (``(W, b)`` where the
    side is not projected); records ``Q`` in ``projectors``."""
    weight_name, bias_name = SIDE_PARAMETERS[side]
    weight = getattr(layer, f"{weight_name}_{cell}").detach().to(torch.float64)
    bias = getattr(layer, f"{bias_name}_{cell}").detach().to(torch.float64) if layer.bias else None
    if cell not in bases:
        return weight, bias
    q = _as_basis(bases[cell], weight.shape[1], f"{side}_basis[{cell!r}]", weight)
    mu = _as_vector(means.get(cell), weight.shape[1], f"{side}_mean[{cell!r}]", weight)
    shift = weight @ (mu - q @ (q.T @ mu))
    if bias is None and bool(shift.any()):
        raise ValueError(f"{side}_mean: the layer has no biases (bias=False) to fold a mean into; "
                         "project it on uncentred statistics and give no mean.")
    projectors[cell] = q
    return weight @ q, None if bias is None else bias + shift


def _parameters(tensors: dict, like: torch.Tensor) -> nn.ParameterDict | None:
    """The tensors as parameters of ``like``'s dtype and trainability; ``None`` when there are none."""
    if not tensors:
        return None
    return nn.ParameterDict({name: nn.Parameter(t.to(like.dtype).contiguous(),
                                                requires_grad=like.requires_grad)
                             for name, t in tensors.items()})
