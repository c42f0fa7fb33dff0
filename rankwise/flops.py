"""Counting the floating-point operations of a forward pass.

Fewer learnables do not always mean fewer operations (a projected recurrence that rebuilds its
weights at each call), and fewer operations do not always mean a faster network
(:mod:`rankwise.latency`). :func:`count_flops` counts matrix products and convolutions with
``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add) and the fused recurrent
kernels, which that counter does not see, by their formula (:func:`recurrent_flops`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from rankwise.batches import as_call, eval_mode
from rankwise.layers import ProjectedRecurrent
from rankwise.rnn import GATES, fused_gates


def count_flops(model: nn.Module, example_input) -> int:
    """Floating-point operations of one forward pass of ``model`` on ``example_input``.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (``display=False``), which knows
    the formulas of torch's matrix products and convolutions and counts **2 FLOPs per
    multiply-add** (so ``nn.Linear(20, 30)`` on a batch of 4 gives ``2 * 4 * 20 * 30 = 4800``).
    torch's fused recurrent kernels have no formula there; they are added here
    (:func:`recurrent_flops`) for every ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``, and for a
    :class:`~rankwise.layers.ProjectedLSTM` / ``ProjectedGRU`` on its dense path (its factored
    path is made of matrix products, which the counter sees, as it sees the dense path's
    rebuilding of the weights); where the counter does see a fused kernel's products (a
    ``PackedSequence`` on the CPU), the formula replaces them. Operations without a formula
    still count zero: element-wise
    operations, activations, normalisations, the gates' element-wise arithmetic and biases.
    The model runs in eval mode under ``torch.inference_mode()``; the mode of each submodule
    is restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
    example_input : torch.Tensor, tuple, list or dict
        As for :func:`median_latency`.

    Returns
    -------
    int
        Total FLOPs (2 per multiply-add).
    """
    from torch.utils.flop_counter import FlopCounterMode  # imported here: ~75 ms off `import rankwise`

    args, kwargs = as_call(example_input)
    counter = FlopCounterMode(display=False)
    corrections = []
    hooks = [hook for module in model.modules() if _recurrent_gates(module)
             for hook in _recurrent_hooks(module, counter, corrections)]
    try:
        with eval_mode(model), torch.inference_mode(), counter:
            model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return int(counter.get_total_flops()) + sum(corrections)


def recurrent_flops(module: nn.Module, input) -> int:
    """FLOPs of torch's fused kernel for one call of a recurrent layer on ``input``.

    Per time step of each sequence, each stacked layer ``l`` and each direction, the gate
    pre-activations ``W_ih x_t + W_hh h_{t-1}`` cost ``G H (D_l + R)`` multiply-adds, with ``G``
    gates (4 for an LSTM, 3 for a GRU, 1 for a plain RNN), hidden size ``H``, ``D_l`` the input
    width of layer ``l`` (``input_size``, then ``R`` times the directions) and ``R`` the width of
    the recurrent state (``proj_size`` of an LSTM with a projection, else ``H``); an LSTM's
    projection adds ``H R``. At 2 FLOPs per multiply-add::

        2 * T_total * sum_{l, direction} (G H (D_l + R) + [proj_size] H R)

    with ``T_total`` the time steps of all sequences (``T N`` padded, the rows of a
    ``PackedSequence``). The gates' element-wise arithmetic and the biases are not counted, as
    :func:`count_flops` counts no element-wise operation.

    Parameters
    ----------
    module : nn.LSTM, nn.GRU, nn.RNN or ProjectedLSTM / ProjectedGRU
    input : torch.Tensor or PackedSequence
        The layer's input: ``(T, D)`` unbatched, ``(T, N, D)`` (``(N, T, D)`` with
        ``batch_first``) or packed.

    Returns
    -------
    int
    """
    gates, hidden = _recurrent_gates(module), module.hidden_size
    projection = getattr(module, "proj_size", 0) or 0
    state = projection or hidden
    directions = 2 if module.bidirectional else 1
    per_step = sum(directions * (gates * hidden * (width + state) + hidden * projection)
                   for width in [module.input_size] + [state * directions] * (module.num_layers - 1))
    steps = input.data.shape[0] if isinstance(input, PackedSequence) else math.prod(input.shape[:-1])
    return 2 * steps * per_step


def _recurrent_gates(module: nn.Module) -> int:
    """Gates of a layer run by torch's fused recurrent kernel (0 for any other module): a projected
    LSTM / GRU on its dense path (by its kind, :data:`rankwise.rnn.GATES`), or one of torch's
    recurrent layers (:func:`rankwise.rnn.fused_gates`)."""
    return GATES[module.kind] if isinstance(module, ProjectedRecurrent) else fused_gates(module)


def _recurrent_hooks(module: nn.Module, counter, corrections: list) -> list:
    """Hooks on a recurrent layer making ``counter``'s count of each fused call the formula's.

    Around each call the counter's total is read: it saw the weights being rebuilt (a projected
    layer's dense path) and, on some paths (a ``PackedSequence`` on the CPU), the fused kernel's
    own products; those of the kernel are replaced by :func:`recurrent_flops`, appended to
    ``corrections``. A factored call is left to the counter.
    """
    started = []

    def before(module, args, kwargs):
        started.append(counter.get_total_flops())

    def after(module, args, kwargs, output):
        input = args[0] if args else kwargs["input"]
        seen = counter.get_total_flops() - started.pop()
        if not _runs_factored(module, input):
            corrections.append(recurrent_flops(module, input) - (seen - _rebuilding_flops(module)))

    return [module.register_forward_pre_hook(before, with_kwargs=True),
            module.register_forward_hook(after, with_kwargs=True)]


def _rebuilding_flops(module: nn.Module) -> int:
    """FLOPs of a projected layer's dense path rebuilding ``W Q^T`` of every projected side (0 else)."""
    total = 0
    for projectors, weight in ((getattr(module, "in_proj", None), "weight_ih"),
                               (getattr(module, "out_proj", None), "weight_hh")):
        for cell, basis in ({} if projectors is None else projectors).items():
            total += 2 * module.core[f"{weight}_{cell}"].shape[0] * basis.shape[0] * basis.shape[1]
    return total


def _runs_factored(module: nn.Module, input) -> bool:
    """Whether a projected recurrent layer takes its factored path (no fused kernel) on ``input``."""
    if not hasattr(module, "uses_factored"):
        return False
    if isinstance(input, PackedSequence):
        batch, device = int(input.batch_sizes[0]), input.data.device
    else:
        batch = 1 if input.dim() == 2 else input.shape[0 if module.batch_first else 1]
        device = input.device
    return module.uses_factored(batch, device)
