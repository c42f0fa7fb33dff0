"""What an option costs in FLOPs on an example input, and each layer's frontier priced in them.

A *cost budget* prices every layer's options in what running the network costs, for the
allocation of :func:`rankwise.ranks.choose_ranks` under a ``flops_reduction_goal`` or a
``latency_reduction_goal``: it has a ``total`` (the whole network's cost, the goal's
denominator), a ``unit`` (how that cost is printed) and ``priced(options)`` (below). Two exist:
:class:`FlopBudget` here, counted, and :class:`rankwise.latency_budget.LatencyBudget`, measured;
both build their frontiers with :func:`priced_frontiers`.

A ``flops_reduction_goal`` is a budget of floating-point operations (2 per multiply-add, as
:func:`rankwise.count_flops` counts them) of one forward pass on an example input. What the
input fixes is, for every analysed layer, how many channel vectors it reads and writes per
call: its *positions* ``N_in`` and ``N_out`` (a ``Linear`` layer's rows, a convolution's
batch times input / output pixels), summed over its calls. With them, an option of a layer
``in -> out`` with kernel ``k`` costs (:func:`option_flops`)

    F(r_in, r_out) = 2 N_in in r_in [input projection]  +  2 N_out a k c  +  2 N_out r_out out [output projection]

with ``a = r_in`` (``in`` without an input projection) and ``c = r_out`` (``out`` without an
output projection); the dense layer costs the FLOPs the counter saw it take. Biases and
element-wise operations are not counted, as :func:`rankwise.count_flops` does not count them.
Only the ``"dense"`` family of :data:`rankwise.kinds.KINDS` (``Linear``, convolutions, GPT-2's
``Conv1D``) is priced: an embedding's lookup costs no FLOPs, so its factored forms only add
some, and the recurrent and attention layers' forms depend on their execution path; those
layers keep only their dense option under a FLOPs goal (:attr:`FlopBudget.unpriced` lists them).

:meth:`FlopBudget.priced` turns each layer's frontier (learnables ascending, error descending)
into one in FLOPs: the options that save FLOPs, sorted by FLOPs, those beaten by another on both
FLOPs and error dropped, then dense. The allocation of :mod:`rankwise.ranks.allocation` runs on
it unchanged, with FLOPs in place of learnables. The options are those of the learnables
frontier: an option dropped there (beaten on learnables and error) is not reconsidered, which
can only matter for a strided convolution, whose input projection runs at more positions than
its core.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from rankwise.ranks.options import LayerOptions, RankChoice


@dataclass(frozen=True)
class LayerGeometry:
    """What an example input makes one dense-family layer do, per forward pass.

    Attributes
    ----------
    in_channels, out_channels, kernel_numel : int
        The layer's ``W`` of shape ``(out, in, *kernel)``.
    positions_in, positions_out : int
        Channel vectors read and written, summed over its calls.
    dense_flops : int
        FLOPs the counter saw the dense layer take.
    """

    in_channels: int
    out_channels: int
    kernel_numel: int
    positions_in: int
    positions_out: int
    dense_flops: int


@dataclass(frozen=True)
class FlopBudget:
    """The FLOPs of a network on one example input and the geometry of its analysed layers.

    Made by :func:`rankwise.flops.flop_budget`; read by
    :func:`rankwise.ranks.choose_ranks` under a ``flops_reduction_goal``.

    Attributes
    ----------
    network_flops : int
        FLOPs of one forward pass of the whole network (the goal's denominator).
    layers : dict of str to LayerGeometry
        The analysed layers whose options are priced.
    unpriced : dict of str to int
        The analysed layers whose options are not priced (see the module docstring), with the
        FLOPs the counter saw them take.
    round_to : int
        Only options whose projected widths are multiples of it are priced (the others are left
        out of the frontier): CPU convolution kernels pad channels to blocks of 8 or 16, so a
        width between two multiples costs the time of the next one.
    """

    network_flops: int
    layers: dict = field(default_factory=dict)
    unpriced: dict = field(default_factory=dict)
    round_to: int = 1

    unit = "FLOPs"

    @property
    def total(self) -> int:
        """The network's FLOPs: the goal's denominator."""
        return self.network_flops

    def option_flops(self, options: LayerOptions) -> np.ndarray:
        """FLOPs of every option of ``options`` (dense last); all at the dense FLOPs for an
        unpriced layer."""
        if options.name not in self.layers:
            return np.full(len(options.learnables), self.unpriced.get(options.name, 0), dtype=np.int64)
        flops = option_flops(self.layers[options.name], options)
        side = options.side
        off_grid = ((((side == 1) | (side == 3)) & (options.rank_in % self.round_to != 0))
                    | (((side == 2) | (side == 3)) & (options.rank_out % self.round_to != 0)))
        return np.where(off_grid, flops[-1], flops)  # left out as costing what dense costs

    def choice_flops(self, name: str, choice: RankChoice) -> int:
        """FLOPs of layer ``name`` in the form of ``choice``."""
        if name not in self.layers:
            return int(self.unpriced.get(name, 0))
        if choice.side == "dense":
            return self.layers[name].dense_flops
        return int(factored_flops(self.layers[name], choice.rank_in, choice.rank_out))

    def flops_after(self, choices: dict) -> int:
        """The network's FLOPs with each layer of ``choices`` (name to RankChoice) in its form."""
        return self.network_flops - sum(self.choice_flops(name, _DENSE) - self.choice_flops(name, choice)
                                        for name, choice in choices.items())

    def priced(self, options: dict[str, LayerOptions]):
        """Every layer's frontier in FLOPs, and the map back to the options' own indices.

        Returns
        -------
        priced : dict of str to LayerOptions
            The same options with ``learnables`` holding their FLOPs: those saving FLOPs, FLOPs
            ascending and error strictly descending, then the dense option.
        back : dict of str to numpy.ndarray
            ``back[name][i]`` is the index in ``options[name]`` of ``priced[name]``'s option ``i``.
        """
        return priced_frontiers(options, self.option_flops)


def factored_flops(geometry: LayerGeometry, rank_in, rank_out):
    """``F(r_in, r_out)`` of a factored form (``None``: that side not projected; numpy arrays
    of ranks with ``0`` for a side not projected work elementwise)."""
    g = geometry
    r_in = np.asarray(0 if rank_in is None else rank_in)
    r_out = np.asarray(0 if rank_out is None else rank_out)
    core_in = np.where(r_in > 0, r_in, g.in_channels)
    core_out = np.where(r_out > 0, r_out, g.out_channels)
    return (2 * g.positions_in * g.in_channels * r_in + 2 * g.positions_out * core_in * g.kernel_numel * core_out
            + 2 * g.positions_out * g.out_channels * r_out)


def option_flops(geometry: LayerGeometry, options: LayerOptions) -> np.ndarray:
    """``F(r_in, r_out)`` of every option (see the module docstring); the dense option costs
    ``geometry.dense_flops``."""
    side = options.side
    r_in = np.where((side == 1) | (side == 3), options.rank_in, 0)
    r_out = np.where((side == 2) | (side == 3), options.rank_out, 0)
    return np.where(side == 0, geometry.dense_flops, factored_flops(geometry, r_in, r_out)).astype(np.int64)


def priced_frontiers(options: dict[str, LayerOptions], option_costs, names=None):
    """Every layer's frontier priced by ``option_costs(layer_options)`` (the cost of each option,
    dense last): the options cheaper than dense and beaten by no other on cost and error, cost
    ascending, then dense (:func:`cheaper_frontier`), with their costs in the place of the
    learnables; and ``back[name]``, the indices in ``options[name]`` of the priced options.
    ``names``: the layers in the order to price them (default: ``options``; e.g. a progress bar
    over it)."""
    priced, back = {}, {}
    for name in options if names is None else names:
        cost = option_costs(options[name])
        keep = cheaper_frontier(cost, options[name].error)
        back[name] = keep
        priced[name] = priced_subset(options[name], keep, cost[keep])
    return priced, back


def cheaper_frontier(cost: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Indices of the options cheaper than dense (the last) and beaten by no other on cost and
    error, cost ascending, then the dense option."""
    dense = len(cost) - 1
    cheaper = np.nonzero(cost[:dense] < cost[dense])[0]
    order = cheaper[np.lexsort((error[cheaper], cost[cheaper]))]
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], error[order]]))[:-1]
    return np.append(order[error[order] < best_before], dense)


def priced_subset(options: LayerOptions, keep: np.ndarray, cost: np.ndarray) -> LayerOptions:
    """``options`` restricted to ``keep``, with ``cost`` (the kept options' costs) in the place
    of the learnables."""
    columns = {name: getattr(options, name)[keep] for name in ("side", "rank_in", "rank_out", "residual", "error")}
    return replace(options, learnables=cost, **columns)


_DENSE = RankChoice("dense", None, None, 0, 0.0, 0.0)
