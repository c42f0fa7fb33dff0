"""Keeping an optimizer's state consistent with parameters that changed shape.

The evolver replaces every parameter it changes by a new ``nn.Parameter``
(:mod:`rankwise.evolve.edits` says why). An attached optimizer gets the new parameter in place
of the old one in its parameter groups, and the old one's state moves to it: every state
tensor with the parameter's old shape (Adam's ``exp_avg`` and ``exp_avg_sq``, SGD's
``momentum_buffer``, ...) is re-indexed by the same index maps as the parameter:

- entries kept from the old parameter keep their state (a kept channel, or a consumer
  column refitted by least squares, keeps its moment estimates);
- new entries (grown channels, and rotated channels, which mix old ones) start from zero
  state, as at the optimizer's first step. For Adam, whose step count is shared by the whole
  tensor, the bias correction is then already near one, so a new entry's first update is
  about ``(1 - beta1) / sqrt(1 - beta2) = 3.2`` times a usual first step (``beta = 0.9,
  0.999``): a few learning rates, not a jump.

Scalar state (Adam's ``step``) is left as it is.
"""

from __future__ import annotations

import torch

from rankwise.evolve.edits import take


def sync_optimizer(optimizer: torch.optim.Optimizer, replaced: dict) -> None:
    """Swap the replaced parameters of ``optimizer`` for the new ones and re-index their state.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    replaced : dict
        ``{old parameter: (new parameter, TensorChange)}`` as returned by
        :meth:`rankwise.evolve.edits.Plan.apply`.
    """
    for group in optimizer.param_groups:
        group["params"] = [replaced[p][0] if p in replaced else p for p in group["params"]]
    for old, (new, change) in replaced.items():
        state = optimizer.state.pop(old, None)
        if state is None:
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == change.old_shape:
                state[key] = _reindexed(value, change.maps)
        optimizer.state[new] = state


def _reindexed(value: torch.Tensor, maps: list) -> torch.Tensor:
    for dim, source in maps:
        value = take(value, dim, source, 0.0)
    return value


def holds_any(optimizer: torch.optim.Optimizer, parameters) -> bool:
    """True when one of ``parameters`` is in one of the optimizer's parameter groups."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return any(id(p) in held for p in parameters)
