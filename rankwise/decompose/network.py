"""A factorised kernel as a small tensor network.

Every decomposition of a kernel ``W`` (a cut, Tucker, CP, a tensor train) is stored the same
way: a list of nodes, each a float64 tensor whose axes carry names. An axis named after a
kernel leg (``o``, ``i``, ``h``, ``w``) is *physical*; any other name is a *bond*, summed
over between the nodes that share it. The kernel is the contraction of all nodes,

.. math:: W'[o, i, h, w] = \\sum_{\\text{bonds}} \\prod_{n} T_n[\\text{axes of } n],

which is one ``torch.einsum``. A bond shared by two nodes is an ordinary edge; a bond shared
by more (the CP index ``r``) is a hyperedge, summed once for all of them.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Node:
    """One factor of a kernel network: ``tensor`` with one name per axis in ``axes``."""

    tensor: torch.Tensor
    axes: tuple[str, ...]

    def size(self, axis: str) -> int:
        """Length of the axis named ``axis``."""
        return self.tensor.shape[self.axes.index(axis)]

    def arranged(self, axes) -> torch.Tensor:
        """The tensor with its axes permuted into the order ``axes`` (all of them, once each)."""
        if sorted(axes) != sorted(self.axes):
            raise ValueError(f"cannot arrange axes {self.axes} as {tuple(axes)}")
        return self.tensor.permute([self.axes.index(axis) for axis in axes])


@dataclass(frozen=True)
class KernelNetwork:
    """Nodes whose contraction is a kernel with legs ``legs`` (e.g. ``"oihw"``)."""

    nodes: tuple[Node, ...]
    legs: str

    def contract(self) -> torch.Tensor:
        """The kernel ``W'``, axes in the order of ``legs``."""
        names = sorted({axis for node in self.nodes for axis in node.axes})
        letter = dict(zip(names, string.ascii_letters))
        inputs = ",".join("".join(letter[a] for a in node.axes) for node in self.nodes)
        output = "".join(letter[leg] for leg in self.legs)
        return torch.einsum(f"{inputs}->{output}", *(node.tensor for node in self.nodes))

    def holding(self, axis: str) -> list[int]:
        """Indices of the nodes that have an axis named ``axis``."""
        return [k for k, node in enumerate(self.nodes) if axis in node.axes]

    def axis_sizes(self) -> dict[str, int]:
        """Every axis name (legs and bonds) and its length."""
        return {axis: node.size(axis) for node in self.nodes for axis in node.axes}

    def bonds(self, index: int) -> list[str]:
        """The bond (non-leg) axes of node ``index``."""
        return [axis for axis in self.nodes[index].axes if axis not in self.legs]

    @property
    def ranks(self) -> tuple[int, ...]:
        """The length of every bond, in order of first appearance."""
        sizes = self.axis_sizes()
        return tuple(sizes[bond] for bond in dict.fromkeys(b for k in range(len(self.nodes))
                                                            for b in self.bonds(k)))

    def map_leg(self, leg: str, matrix: torch.Tensor) -> "KernelNetwork":
        """The network with leg ``leg`` multiplied by ``matrix``: ``T'[.., a, ..] = sum_l T[.., l, ..] M[l, a]``.

        Applied to the kernel's own node, this is the mode product ``W x_leg M^T``.
        """
        (index,) = self.holding(leg)
        node = self.nodes[index]
        position = node.axes.index(leg)
        mapped = torch.tensordot(node.tensor, matrix, dims=([position], [0])).movedim(-1, position)
        nodes = list(self.nodes)
        nodes[index] = Node(mapped, node.axes)
        return KernelNetwork(tuple(nodes), self.legs)
