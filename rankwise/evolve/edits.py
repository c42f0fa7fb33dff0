"""A planned change of a model's tensors, built on copies and applied all at once.

Shrinking or growing a width touches several layers; every new tensor is computed first in a
:class:`Plan`, so that an error while planning leaves the model as it was, and only
:meth:`Plan.apply` writes to the model. A parameter whose shape changes is replaced by a new
``nn.Parameter`` (giving an existing one a new shape through ``param.data`` is not safe:
autograd keeps the shape of a leaf tensor it has seen, and a backward pass through a graph
built before the change fails); what changed along each dimension is recorded as *index maps*
for the optimizer, whose parameter lists and state follow (:mod:`.optimizer`).

An index map along a dimension is a tensor ``source`` of the new length: entry ``i`` of the new
tensor comes from entry ``source[i]`` of the old one, or is new when ``source[i] = -1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn



@dataclass
class TensorChange:
    """The new value of one parameter or buffer and the index maps that lead to it.

    ``maps`` is a list of ``(dim, source)`` applied in order to the old tensor's shape; it
    is empty when only values changed.
    """

    value: torch.Tensor
    old_shape: torch.Size
    maps: list = field(default_factory=list)


def take(tensor: torch.Tensor, dim: int, source: torch.Tensor, fill=0.0) -> torch.Tensor:
    """Entries of ``tensor`` along ``dim`` picked by ``source`` (``-1``: new, set to ``fill``).

    ``fill`` is a number, or a tensor holding the new entries in order along ``dim``.
    """
    result = tensor.index_select(dim, source.clamp(min=0).to(tensor.device))
    new = (source < 0).nonzero().flatten().to(tensor.device)
    if len(new):
        result.index_copy_(dim, new, _broadcast_fill(fill, result, dim, len(new)))
    return result


def _broadcast_fill(fill, like: torch.Tensor, dim: int, count: int) -> torch.Tensor:
    shape = list(like.shape)
    shape[dim] = count
    if isinstance(fill, torch.Tensor):
        return fill.to(dtype=like.dtype, device=like.device).reshape(shape)
    return like.new_full(shape, fill)


def expand_blocks(channel_source: torch.Tensor, block: int) -> torch.Tensor:
    """Index map of features from one of channels, each channel a block of ``block`` features."""
    features = channel_source[:, None] * block + torch.arange(block)
    return torch.where(channel_source[:, None] < 0, -1, features).flatten()


def insertion(total: int, position: int, count: int) -> torch.Tensor:
    """Index map that inserts ``count`` new entries before old entry ``position`` of ``total``."""
    old = torch.arange(total)
    return torch.cat([old[:position], torch.full((count,), -1), old[position:]])


def removal(total: int, removed: torch.Tensor) -> torch.Tensor:
    """Index map that keeps every old entry except ``removed``, in order."""
    keep = torch.ones(total, dtype=torch.bool)
    keep[removed] = False
    return keep.nonzero().flatten()


class Plan:
    """New tensors and size attributes for some modules of ``model``, applied together."""

    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules())
        self.changes: dict = {}      # (module name, tensor name) -> TensorChange
        self.sizes: dict = {}        # (module name, attribute) -> int

    def current(self, module: str, name: str) -> torch.Tensor | None:
        """The planned value of ``module.name``, else its present value (detached)."""
        if (module, name) in self.changes:
            return self.changes[module, name].value
        tensor = getattr(self.modules[module], name)
        return None if tensor is None else tensor.detach()

    def resize(self, module: str, name: str, dim: int, source: torch.Tensor, fill=0.0) -> None:
        """Plan ``module.name`` re-indexed along ``dim`` by ``source`` (see :func:`take`)."""
        old = self.current(module, name)
        if old is not None:
            self.replace(module, name, take(old, dim, source, fill), dim, source)

    def replace(self, module: str, name: str, value: torch.Tensor, dim: int | None = None,
                source: torch.Tensor | None = None) -> None:
        """Plan ``value`` for ``module.name``; ``(dim, source)`` says how its entries relate to
        the previous ones (omit both when the shape is unchanged)."""
        change = self._change(module, name)
        change.value = value.to(change.value.dtype)
        if dim is not None:
            change.maps.append((dim, source))

    def set_size(self, module: str, attribute: str, value: int) -> None:
        self.sizes[module, attribute] = value

    def _change(self, module: str, name: str) -> TensorChange:
        if (module, name) not in self.changes:
            tensor = getattr(self.modules[module], name).detach()
            self.changes[module, name] = TensorChange(tensor.clone(), tensor.shape)
        return self.changes[module, name]

    def apply(self) -> dict:
        """Write every planned tensor and size into the model.

        Parameters are replaced by new ``nn.Parameter`` objects (same ``requires_grad``, no
        gradient); buffers by the new tensors.

        Returns
        -------
        dict
            ``{old parameter: (new parameter, TensorChange)}`` for the parameters replaced, for
            :func:`rankwise.evolve.optimizer.sync_optimizer`.
        """
        replaced = {}
        for (module, name), change in self.changes.items():
            tensor = getattr(self.modules[module], name)
            if isinstance(tensor, nn.Parameter):
                parameter = nn.Parameter(change.value, requires_grad=tensor.requires_grad)
                setattr(self.modules[module], name, parameter)
                replaced[tensor] = (parameter, change)
            else:
                setattr(self.modules[module], name, change.value)
        for (module, attribute), value in self.sizes.items():
            setattr(self.modules[module], attribute, value)
        return replaced
