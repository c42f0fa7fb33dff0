"""Counting learnables: of a model, and of a layer in dense or factored form.

One rank convention everywhere: ``rank_in`` is the width of the input projection
(``None`` when the input side is not projected) and ``rank_out`` the width of the
output projection (``None`` when the output side is not projected).
"""

from __future__ import annotations

from torch import nn


def count_learnables(model: nn.Module) -> int:
    """Number of learnable scalars of ``model``.

    Parameters that require gradients are counted once each, even when a module is
    shared between several places of the model.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    int
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def dense_learnables(in_channels: int, out_channels: int, kernel_numel: int, bias: bool) -> int:
    """Learnables of a dense layer ``W`` of shape ``(out, in, *kernel)`` and optional bias."""
    return in_channels * kernel_numel * out_channels + (out_channels if bias else 0)


def factored_learnables(in_channels, out_channels, kernel_numel, rank_in=None, rank_out=None):
    """Learnables of a projected layer ``in -> rank_in -> rank_out -> out``.

    The factored layer is, in order:

    - an input projection ``Q^T`` (``rank_in x in``, no bias) when ``rank_in`` is given;
    - a core with the original kernel, ``a -> c`` channels, where ``a = rank_in or in`` and
      ``c = rank_out or out``, with a bias only when there is no output projection;
    - an output projection ``P`` (``out x rank_out``) with a bias when ``rank_out`` is given.

    So ``L = in r_in + a k c + out (r_out + 1)`` with an output projection and
    ``L = in r_in + a k c + c`` without, the first term present only with an input projection.
    Works elementwise on numpy arrays of ranks.
    """
    core_in = in_channels if rank_in is None else rank_in
    total = core_in * kernel_numel * (out_channels if rank_out is None else rank_out)
    if rank_in is not None:
        total = total + in_channels * rank_in
    return total + (out_channels if rank_out is None else out_channels * (rank_out + 1))


def recurrent_learnables(input_size, hidden_size, gates, bias, rank_in=None, rank_out=None):
    """Learnables of one cell (stacked layer and direction) of an LSTM or GRU layer.

    With ``G`` gates (4 for an LSTM, 3 for a GRU), ``H`` hidden units and ``D`` input features:

    - input side: ``W_ih`` (``G H x D``), or the input projector ``Q_in`` (``D x r_in``) and
      ``W_ih Q_in`` (``G H x r_in``) when ``rank_in`` is given: ``r_in (D + G H)``;
    - recurrent side: ``W_hh`` (``G H x H``), or the projector ``Q_out`` of the hidden state
      (``H x r_out``) and ``W_hh Q_out`` (``G H x r_out``) when ``rank_out`` is given:
      ``r_out (H + G H)``;
    - the biases ``b_ih`` and ``b_hh`` (``2 G H``) when ``bias``.

    Works elementwise on numpy arrays of ranks.
    """
    gate_rows = gates * hidden_size
    inputs = gate_rows * input_size if rank_in is None else rank_in * (input_size + gate_rows)
    hidden = gate_rows * hidden_size if rank_out is None else rank_out * (hidden_size + gate_rows)
    return inputs + hidden + (2 * gate_rows if bias else 0)
