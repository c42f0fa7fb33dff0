"""Counting the floating-point operations of a forward pass, of the network and of its layers.

Fewer learnables do not always mean fewer operations (a projected recurrence that rebuilds its
weights at each call), and fewer operations do not always mean a faster network
(:mod:`rankwise.latency`). :func:`count_flops` counts matrix products and convolutions with
``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add) and the fused recurrent
kernels, which that counter does not see, by their formula (:func:`recurrent_flops`).
:func:`flop_budget` counts the same on one example batch with what each analysed layer reads,
writes and costs, for a ``flops_reduction_goal`` (:mod:`rankwise.ranks.costs`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from rankwise.batches import as_call, eval_mode, forward, model_device, move_to
from rankwise.kinds import kind_of
from rankwise.layers import ProjectedRecurrent
from rankwise.ranks.costs import FlopBudget, LayerGeometry
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
    args, kwargs = as_call(example_input)
    return _counted(model, lambda: model(*args, **kwargs))


def _counted(model: nn.Module, run, layer_hooks=()) -> int:
    """FLOPs of ``run()`` (a forward pass of ``model``) as :func:`count_flops` counts them.

    ``layer_hooks`` are ``(module, after)``: ``after(args, output, flops)`` runs after each call
    of ``module`` with the FLOPs counted during that call.
    """
    from torch.utils.flop_counter import FlopCounterMode  # imported here: ~75 ms off `import rankwise`

    counter = FlopCounterMode(display=False)
    corrections = []
    hooks = [hook for module in model.modules() if _recurrent_gates(module)
             for hook in _recurrent_hooks(module, counter, corrections)]
    hooks += [hook for module, after in layer_hooks for hook in _delta_hooks(module, counter, after)]
    try:
        with eval_mode(model), torch.inference_mode(), counter:
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return int(counter.get_total_flops()) + sum(corrections)


def _delta_hooks(module: nn.Module, counter, after) -> list:
    """Hooks calling ``after(args, output, flops)`` with the FLOPs counted during each call."""
    started = []

    def pre(module, args):
        started.append(counter.get_total_flops())

    def post(module, args, output):
        after(args, output, counter.get_total_flops() - started.pop())

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def flop_budget(model: nn.Module, layers: dict, batch, argument: str = "flops_input",
                forward_fn=None, round_to: int = 1) -> FlopBudget:
    """The network's FLOPs on ``batch`` and what each analysed layer does on it.

    ``batch`` runs as a calibration batch does (``forward_fn(model, batch)``, or a tensor as the
    input, a tuple or list starting with it, a dict as keyword arguments), moved to the model's
    device, counted as :func:`count_flops` counts. Each layer of the ``"dense"`` family records
    the channel vectors it reads and writes and the FLOPs it takes
    (:class:`~rankwise.ranks.costs.LayerGeometry`); the others are listed as unpriced.

    Parameters
    ----------
    model : torch.nn.Module
    layers : dict of str to torch.nn.Module
        The analysed layers by qualified name.
    batch : torch.Tensor, tuple, list or dict
        One example batch.
    argument : str
        The argument ``batch`` came from, named in the errors.
    forward_fn : callable, optional
    round_to : int
        See :class:`~rankwise.ranks.costs.FlopBudget`.

    Returns
    -------
    FlopBudget

    Raises
    ------
    ValueError
        When the forward fails on ``batch``, does not call every analysed layer, counts no FLOPs,
        or counts for a layer other FLOPs than its shapes give (the count cannot follow it).
    """
    seen = {name: [0, 0, 0, 0] for name in layers}  # positions in, positions out, flops, calls
    priced = {name: layer for name, layer in layers.items() if kind_of(layer).family == "dense"}

    def recorder(name, layer):
        out_c, in_c = kind_of(layer).weight(layer).shape[:2] if name in priced else (1, 1)

        def after(args, output, flops):
            record = seen[name]
            record[0] += args[0].numel() // in_c if args and isinstance(args[0], torch.Tensor) else 0
            record[1] += output.numel() // out_c if isinstance(output, torch.Tensor) else 0
            record[2] += flops
            record[3] += 1
        return after

    try:
        total = _counted(model, lambda: forward(model, move_to(batch, model_device(model)), forward_fn),
                         [(layer, recorder(name, layer)) for name, layer in layers.items()])
    except Exception as error:
        raise ValueError(f"{argument}: the model's forward failed on it ({type(error).__name__}: {error}), so "
                         "its FLOPs cannot be counted. Pass a batch the model accepts, as the calibration "
                         "data's (or forward_fn).") from error
    _check_counted(seen, priced, total, argument)
    geometry = {}
    for name, layer in priced.items():
        shape = kind_of(layer).weight(layer).shape
        geometry[name] = LayerGeometry(int(shape[1]), int(shape[0]), math.prod(shape[2:]), *seen[name][:3])
    return FlopBudget(total, geometry, {name: seen[name][2] for name in layers if name not in priced}, round_to)


def check_round_to(round_to, goal) -> None:
    """``round_to`` must be ``None`` or a positive integer, given with a FLOPs goal only."""
    if round_to is None:
        return
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to: expected a positive integer, got {round_to!r}.")
    if goal.kind != "flops_reduction":
        raise ValueError(f"round_to: it rounds the ranks of a flops_reduction_goal; with {goal.argument} "
                         "drop it.")


def flops_example(npca, flops_input) -> tuple[object, str]:
    """The example batch of a FLOPs goal and the argument it came from: ``flops_input``, else the
    first held-out calibration batch of ``npca``; a ValueError when there is neither."""
    if flops_input is not None:
        return flops_input, "flops_input"
    if npca.validation_batches:
        return npca.validation_batches[0], "flops_input (the first held-out calibration batch)"
    raise ValueError("flops_input: a flops_reduction_goal counts FLOPs on an example batch, and none is known "
                     "(no calibration batch was held out: validation=None, a single batch, or a NeuronPCA "
                     "without held-out batches). Pass flops_input=<one batch as deployed>.")


def _check_counted(seen: dict, priced: dict, total: int, argument: str) -> None:
    """Raise when a layer was not called, nothing was counted, or a layer's count is not what its
    shapes give (``2 N_out in k out``)."""
    missing = [name for name, record in seen.items() if record[3] == 0]
    if missing:
        raise ValueError(f"{argument}: the model's forward on it did not call {', '.join(missing)}, so their "
                         "FLOPs cannot be counted. Pass a batch that runs every layer being compressed.")
    if total <= 0:
        raise ValueError(f"{argument}: the FLOP counter saw no floating-point operation in the model's forward "
                         "on it; a FLOPs goal has nothing to reduce.")
    for name, layer in priced.items():
        shape = kind_of(layer).weight(layer).shape
        expected = 2 * seen[name][1] * math.prod(shape)
        if seen[name][2] != expected:
            raise ValueError(f"{argument}: the FLOP count cannot follow layer {name!r} on this input (counted "
                             f"{seen[name][2]:,} FLOPs, its shapes give {expected:,}); give a batch of the "
                             "shape the layer takes in deployment (a tensor, not a packed or nested input).")


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
