"""Running a kernel network as a sequence of standard convolutions: :class:`TruncatedConv`.

A convolution with kernel ``W`` maps input channels to output channels, each output position
summing over a patch. When ``W`` is a network of nodes (see
:mod:`rankwise.decompose.network`), the patch sum can be done one node at a time:

- The **spine** is the path of nodes from the one holding ``i`` to the one holding ``o``.
  Each spine node becomes a dense convolution from the current channels (``i``, or the bond
  from the previous spine node, together with any bonds of filter banks applied just before)
  to the next bond (or ``o``), whose kernel covers the node's own spatial legs (size 1 on the
  others).
- A chain of nodes hanging off a spine node holds only spatial legs: it is a **filter bank**
  applied to every current channel alike. It runs as a depthwise convolution (``C -> C r``,
  ``groups = C``) for its outermost node, then grouped convolutions (``C r -> C r'``,
  ``groups = C``) inward, and the bank's bond joins the channels. Its filters are stored once
  per channel, which the learnables count includes.
- A spine bond shared by more nodes (a hyperedge, the CP index) is a **diagonal**: each extra
  node is a depthwise convolution on that bond's channels.

Every spatial leg belongs to exactly one node, and that node's convolution carries the
layer's stride, padding (and padding mode) and dilation along that axis; every other
convolution is pointwise along it. Pointwise maps commute with padding (no bias before the
last convolution, so padded zeros stay zero; reflected or replicated values are mapped like
any other), hence the sequence computes exactly the convolution with the contracted kernel
``W'``. The bias is added by the last convolution.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import nn

from rankwise.decompose.legs import kernel_legs, spatial_legs
from rankwise.decompose.network import KernelNetwork, Node
from rankwise.forms import SPEC_ATTRIBUTE, CompressedForm
from rankwise.kinds import CONVOLUTIONS
from rankwise.layers.base import fill


class TruncatedConv(CompressedForm, nn.Sequential):
    """A convolution with a truncated kernel, run as a sequence of standard convolutions.

    Built by :func:`rankwise.truncate_kernels`; it holds only ``nn.Conv1d`` / ``nn.Conv2d``
    modules (pointwise, ``k x 1``, ``1 x k``, depthwise or grouped), so it exports to ONNX as
    they do.

    Parameters
    ----------
    convs : sequence of torch.nn.Module
        The convolutions, applied in order.
    method : str
        ``"cut"``, ``"tucker"``, ``"cp"`` or ``"tt"``.
    structure : str
        The cut (``"o|ihw"``), Tucker modes (``"oi"``), leg order of a train (``"ihwo"``), or
        the legs for CP.
    ranks : tuple of int
        The bond lengths: the cut's rank; one per Tucker mode, in the order of the modes; the
        CP rank; one per bond of the train.
    """

    def __init__(self, convs, method: str, structure: str, ranks):
        super().__init__(*convs)
        self.method = method
        self.structure = structure
        self.ranks = tuple(ranks)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, structure={self.structure!r}, ranks={self.ranks}"

    def unpack(self) -> nn.Sequential:
        """The same convolutions as a plain ``torch.nn.Sequential`` (parameters shared), carrying
        :meth:`spec` as its attribute ``rankwise_spec``."""
        unpacked = nn.Sequential(*self)
        setattr(unpacked, SPEC_ATTRIBUTE, self.spec())
        return unpacked

    def spec(self) -> dict:
        """A plain, JSON-friendly description from which :meth:`from_spec` rebuilds the structure."""
        return {"type": type(self).__name__, "method": self.method, "structure": self.structure,
                "ranks": list(self.ranks), "convs": [_conv_spec(conv) for conv in self]}

    @classmethod
    def from_spec(cls, layer: nn.Module, spec: dict) -> "TruncatedConv":
        """A wrapper with the structure in ``spec`` (see :meth:`spec`) for the convolution ``layer``
        it replaced, which gives the dtype and trainability; load its state dict after.

        The spec lists every convolution, so the sizes do not depend on ``layer``'s (a
        calibrated truncation may add a bias the layer lacked).
        """
        cls.check_spec_type(spec)
        like = layer.weight
        convs = [CONVOLUTIONS[conv["dims"]](**{k: _tuple(v) for k, v in conv.items() if k != "dims"},
                                          device=like.device, dtype=like.dtype
                                          ).requires_grad_(like.requires_grad)
                 for conv in spec["convs"]]
        return cls(convs, spec["method"], spec["structure"], spec["ranks"])


SPEC_FIELDS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
               "groups", "padding_mode")


def network_convs(network: KernelNetwork, like: nn.Module, bias: torch.Tensor | None) -> list[nn.Module]:
    """The convolutions computing ``like`` with its kernel replaced by ``network``'s contraction.

    Parameters
    ----------
    network : KernelNetwork
        Legs as ``like``'s kernel.
    like : torch.nn.Conv1d or torch.nn.Conv2d
        Gives the stride, padding, padding mode, dilation, dtype, device and trainability.
    bias : torch.Tensor or None
        Added by the last convolution.

    Returns
    -------
    list of torch.nn.Module
    """
    sizes = network.axis_sizes()
    spine = _spine(network)
    convs, channels = [], ["i"]
    for position, index in enumerate(spine):
        for bond, chain in _dangling_chains(network, index, spine):
            convs += _filter_bank(network, bond, chain, math.prod(sizes[c] for c in channels), like)
            channels.append(bond)
        last = position == len(spine) - 1
        outgoing = "o" if last else _shared_bond(network, index, spine[position + 1])
        convs.append(_dense(network.nodes[index], outgoing, channels, like, bias if last else None))
        channels = [outgoing]
        convs += [_diagonal(network.nodes[k], outgoing, like)
                  for k in network.holding(outgoing) if k not in spine]
    return convs


def macs_per_output_position(layers) -> int:
    """Multiply-adds of a convolution or a sequence of them, per position of the final output.

    A convolution costs ``out * (in / groups) * prod(kernel)`` multiply-adds per position of
    its own output. One placed before convolutions with strides ``s_d`` runs at ``prod_d s_d``
    times more positions than the final output (borders ignored), and is counted so.
    """
    total, ratio = 0, 1
    for conv in reversed(list(layers)):
        total += ratio * conv.out_channels * conv.in_channels // conv.groups * math.prod(conv.kernel_size)
        ratio *= math.prod(conv.stride)
    return total


# The spine and what hangs off it --------------------------------------------------------------

def _spine(network: KernelNetwork) -> list[int]:
    """Node indices on the path from the node holding ``i`` to the one holding ``o`` (BFS)."""
    (start,), (goal,) = network.holding("i"), network.holding("o")
    previous = {start: None}
    queue = deque([start])
    while queue:
        current = queue.popleft()
        for bond in network.bonds(current):
            for neighbour in network.holding(bond):
                if neighbour not in previous:
                    previous[neighbour] = current
                    queue.append(neighbour)
    path = [goal]
    while path[-1] != start:
        path.append(previous[path[-1]])
    return path[::-1]


def _shared_bond(network: KernelNetwork, first: int, second: int) -> str:
    (bond,) = set(network.bonds(first)) & set(network.bonds(second))
    return bond


def _dangling_chains(network: KernelNetwork, index: int, spine: list[int]):
    """``(bond, chain)`` for each chain of off-spine nodes joined to node ``index`` by ``bond``.

    Each chain lists its nodes from the spine outward; hyperedges are left to :func:`_diagonal`.
    """
    for bond in network.bonds(index):
        holders = network.holding(bond)
        if len(holders) != 2 or all(k in spine for k in holders):
            continue
        chain, via = [next(k for k in holders if k != index)], bond
        while onward := [b for b in network.bonds(chain[-1]) if b != via]:
            (via,) = onward
            chain.append(next(k for k in network.holding(via) if k != chain[-1]))
        yield bond, chain


# One convolution per node -----------------------------------------------------------------------

def _filter_bank(network: KernelNetwork, bond: str, chain: list[int], groups: int,
                 like: nn.Module) -> list[nn.Module]:
    """Depthwise then grouped convolutions applying the filters of ``chain`` (attached to the
    spine by ``bond``, listed from the spine outward) to each of ``groups`` channels alike."""
    convs = []
    for position in reversed(range(len(chain))):
        up = _shared_bond(network, chain[position], chain[position - 1]) if position else bond
        down = [b for b in network.bonds(chain[position]) if b != up]
        weight, carried = _kernel_weight(network.nodes[chain[position]], (up, *down), like)
        weight = weight.reshape(weight.shape[0], -1, *weight.shape[1 + len(down):])
        convs.append(_conv(like, weight.repeat(groups, *[1] * (weight.dim() - 1)), groups, carried))
    return convs


def _dense(node: Node, outgoing: str, channels: list[str], like: nn.Module, bias) -> nn.Module:
    weight, carried = _kernel_weight(node, (outgoing, *channels), like)
    weight = weight.reshape(weight.shape[0], -1, *weight.shape[1 + len(channels):])
    return _conv(like, weight, 1, carried, bias)


def _diagonal(node: Node, bond: str, like: nn.Module) -> nn.Module:
    weight, carried = _kernel_weight(node, (bond,), like)
    return _conv(like, weight.unsqueeze(1), weight.shape[0], carried)


def _kernel_weight(node: Node, leading, like: nn.Module) -> tuple[torch.Tensor, str]:
    """The node's tensor as ``(*leading, *kernel)``, kernel size 1 on the legs it lacks."""
    spatial = spatial_legs(kernel_legs(like))
    carried = "".join(leg for leg in spatial if leg in node.axes)
    tensor = node.arranged((*leading, *carried))
    kernel = [node.size(leg) if leg in carried else 1 for leg in spatial]
    return tensor.reshape(*tensor.shape[:len(leading)], *kernel), carried


def _conv(like: nn.Module, weight: torch.Tensor, groups: int, carried: str, bias=None) -> nn.Module:
    """A convolution of ``like``'s type with ``weight`` (out, in / groups, *kernel), carrying
    ``like``'s stride, padding, padding mode and dilation along the spatial legs ``carried``."""
    spatial = spatial_legs(kernel_legs(like))

    def along(values, otherwise):
        return tuple(v if leg in carried else otherwise for v, leg in zip(values, spatial))

    padding = like.padding if isinstance(like.padding, str) else along(like.padding, 0)
    conv = CONVOLUTIONS[len(spatial)](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                stride=along(like.stride, 1), padding=padding, dilation=along(like.dilation, 1),
                groups=groups, bias=bias is not None,
                padding_mode=like.padding_mode if carried else "zeros",
                device=like.weight.device, dtype=like.weight.dtype)
    return fill(conv, weight.to(like.weight.dtype), None if bias is None else bias.to(like.weight.dtype),
                like)


def _conv_spec(conv: nn.Module) -> dict:
    spec = {name: getattr(conv, name) for name in SPEC_FIELDS}
    return {**spec, "dims": conv.weight.dim() - 2, "bias": conv.bias is not None}


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value
