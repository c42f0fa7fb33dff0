"""truncate_kernels: tensor-network truncation of convolution kernels, and what it reports.

Model -> :mod:`~rankwise.decompose.targets` (which convolutions) -> a method of
:mod:`~rankwise.decompose.methods` (cut, Tucker, CP, tensor train; optionally on the kernel in
whitened input coordinates, :mod:`~rankwise.decompose.calibration`) -> a
:class:`~rankwise.decompose.network.KernelNetwork` -> :class:`TruncatedConv` (standard
convolutions, :mod:`~rankwise.decompose.execution`) -> the truncated model and a
:class:`TruncationInfo`. Every argument is checked before any kernel is decomposed; the input
model is never modified unless ``inplace=True``, and not at all when an error is raised.
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from rankwise.decompose.calibration import InputWeighting, calibration_statistics, input_weighting
from rankwise.decompose.execution import TruncatedConv, macs_per_output_position, network_convs
from rankwise.decompose.legs import kernel_legs
from rankwise.decompose.methods import METHODS, Method
from rankwise.decompose.selection import check_norm_retained
from rankwise.decompose.truncatable import select_kernels
from rankwise.learnables import count_learnables
from rankwise.checks import check_verbosity
from rankwise.tables import format_table
from rankwise.targets import layer_kind


@dataclass(frozen=True)
class LayerTruncation:
    """What happened to one convolution.

    Attributes
    ----------
    name, kind : str
        Qualified name and ``"conv1d"`` / ``"conv2d"``.
    method, structure : str
        E.g. ``"cut"`` and ``"oh|iw"``; ``"tt"`` and ``"ihwo"``.
    ranks : tuple of int
        The bond lengths (see :class:`TruncatedConv`).
    relative_norm_loss : float
        ``|W - W'| / |W|`` (Frobenius), ``W'`` the kernel the truncated layer computes.
    learnables_before, learnables_after : int
        Of this layer, dense and truncated (filter banks count once per channel they filter).
    flops_before, flops_after : int
        Multiply-adds (the unit compression papers usually call FLOPs) per position of the
        layer's output, all output channels; see
        :func:`~rankwise.decompose.execution.macs_per_output_position`.
    relative_output_loss : float or None
        With calibration data: the estimated relative error of the layer's centred output,
        ``sqrt(sum_k tr(D_k C D_k^T) / sum_k tr(W_k C W_k^T))`` for ``D = W - W'`` (kernel taps
        taken as independent); ``None`` without.
    requested_rank : int or None
        The integer rank asked for the whole network when this layer's kernel allows less and the
        ranks were clipped to ``ranks``; ``None`` when nothing was clipped.
    """

    name: str
    kind: str
    method: str
    structure: str
    ranks: tuple
    relative_norm_loss: float
    learnables_before: int
    learnables_after: int
    flops_before: int
    flops_after: int
    relative_output_loss: float | None = None
    requested_rank: int | None = None


@dataclass(frozen=True)
class TruncationInfo:
    """Outcome of :func:`truncate_kernels`.

    Attributes
    ----------
    method : str
    learnables_before, learnables_after : int
        Learnables of the whole network.
    layers : dict of str to LayerTruncation
        Every truncated convolution, in model order.
    kept_dense : dict of str to LayerTruncation
        The convolutions left dense because their truncated form would not have had fewer
        learnables (what that form would have been), unless ``allow_larger=True``.
    """

    method: str
    learnables_before: int
    learnables_after: int
    layers: dict
    kept_dense: dict = field(default_factory=dict)

    @property
    def learnables_reduction(self) -> float:
        """Fraction of the whole network's learnables removed (negative when it grew)."""
        return 1.0 - self.learnables_after / self.learnables_before

    @property
    def layer_names(self) -> list[str]:
        """The truncated layers, in model order."""
        return list(self.layers)

    def table(self) -> str:
        """A before/after table: structure, ranks, norm loss, learnables and FLOPs per layer."""
        with_output = any(t.relative_output_loss is not None for t in self.layers.values())
        header = ["layer", "type", "structure", "ranks", "norm loss", "learnables", "MACs / position"]
        rows = [[t.name, t.kind, t.structure, ",".join(map(str, t.ranks)), f"{t.relative_norm_loss:.4f}",
                 f"{t.learnables_before:,} -> {t.learnables_after:,}",
                 f"{t.flops_before:,} -> {t.flops_after:,}"] for t in self.layers.values()]
        if with_output:
            header.insert(5, "output loss")
            for row, t in zip(rows, self.layers.values()):
                row.insert(5, f"{t.relative_output_loss:.4f}")
        footer = (f"network: {self.learnables_before:,} -> {self.learnables_after:,} learnables "
                  f"({100 * self.learnables_reduction:.1f}% removed), method {self.method!r}")
        clipped = [f"{t.name} ({t.requested_rank} -> {','.join(map(str, t.ranks))})"
                   for t in (*self.layers.values(), *self.kept_dense.values())
                   if t.requested_rank is not None]
        if clipped:
            footer += f"\nranks clipped to what the kernel allows: {', '.join(clipped)}"
        if self.kept_dense:
            footer += ("\nkept dense, the truncated form not smaller (allow_larger=True truncates them): "
                       + ", ".join(f"{t.name} ({t.learnables_before:,} -> {t.learnables_after:,} learnables)"
                                   for t in self.kept_dense.values()))
        return format_table(header, rows, footer)

    def __str__(self) -> str:
        return self.table()


def truncate_kernels(model: nn.Module, method: str, *, cut: str | None = None, modes: str | None = None,
                     order: str | None = None, ranks=None, norm_retained: float | None = None,
                     layer_names=None, exclude=None, calibration=None, allow_larger: bool = False,
                     inplace: bool = False, verbosity: str = "summary"):
    """Replace convolution kernels by truncated tensor networks, run as standard convolutions.

    Following Singh, Jahromi and Orus (arXiv 2403.14379), the kernel ``W[o, i, h, w]`` of each
    ``nn.Conv2d`` (``W[o, i, w]`` of each ``nn.Conv1d``) is decomposed and truncated:

    - ``"cut"``: SVD of ``W`` matricised along a bipartition of its legs, ``cut="oh|iw"``
      (:mod:`~rankwise.decompose.cuts`; every bipartition is accepted);
    - ``"tucker"``: Tucker over ``modes`` (``"oi"``, Tucker-2, by default; ``"oihw"`` is full
      Tucker), fitted by HOOI (:mod:`~rankwise.decompose.tucker`);
    - ``"cp"``: CP, SVD-initialised ALS (:mod:`~rankwise.decompose.cp`);
    - ``"tt"``: a tensor train along the leg ``order`` (``"ihwo"`` by default), by TT-SVD
      (:mod:`~rankwise.decompose.tt`).

    Each truncated layer becomes a :class:`TruncatedConv`: a sequence of plain ``nn.Conv1d`` /
    ``nn.Conv2d`` (pointwise, ``k x 1``, ``1 x k``, depthwise, grouped) computing exactly the
    convolution with the truncated kernel ``W'``, with the layer's stride, padding, padding mode,
    dilation and bias; it exports to ONNX. At full rank, cuts, Tucker and tensor trains
    reproduce the layer's output up to float32 round-off.

    Parameters
    ----------
    model : torch.nn.Module
    method : {"cut", "tucker", "cp", "tt"}
    cut : str, optional
        The bipartition for ``method="cut"``: the legs of one side, ``|``, the others
        (default ``"o|ihw"``, or ``"o|iw"`` for Conv1d, whose spatial leg is ``w``).
    modes : str, optional
        The legs Tucker compresses (default ``"oi"``).
    order : str, optional
        The chain of a tensor train, every leg once (default ``"ihwo"`` / ``"iwo"``).
    ranks : int, tuple of int, or dict, optional
        The cut's rank; one per Tucker mode (in the order of ``modes``); the CP rank; one per
        bond of the train. An int means that rank everywhere, clipped in each layer to the
        largest its kernel allows (``info.layers[name].requested_rank`` and the table say where);
        a tuple is taken as given. A dict maps layer names to ranks (and, without
        ``layer_names``, selects those layers). Exclusive with ``norm_retained``.
    norm_retained : float in (0, 1], optional
        Per layer, the smallest ranks with ``|W - W'| / |W| <= sqrt(1 - f^2)``, i.e. keeping at
        least the fraction ``f`` of the kernel norm (see :mod:`~rankwise.decompose.selection`;
        for CP, where the largest rank misses it, that fit). With ``calibration`` the bound
        holds in whitened input coordinates, ``|(W - W') x_i S| / |W x_i S| <= sqrt(1 - f^2)``
        with ``S = (C + delta I)^{1/2}``: for the estimated output error (close to
        ``relative_output_loss``), not for the kernel itself, whose ``relative_norm_loss`` can
        be much larger.
    layer_names : str or list of str, optional
        The convolutions to truncate, by qualified name, glob pattern (``"features.*"``) or
        ``"re:"``-prefixed regular expression (see :mod:`rankwise.targets`); every ``Conv1d`` /
        ``Conv2d`` with ``groups=1`` by default.
    exclude : str or list of str, optional
        Names or patterns of convolutions to leave as they are.
    calibration : NeuronPCA or iterable of batches, optional
        Data-aware truncation: the kernel is truncated in whitened input coordinates, so that
        ranks and the truncation minimise the estimated output error rather than the kernel
        error, and the mean error is folded into the bias (a bias is added to a layer without
        one). See :mod:`~rankwise.decompose.calibration`.
    allow_larger : bool
        Truncate a layer even when its truncated form has at least as many learnables as the
        dense one. By default such a layer stays dense and is listed in ``info.kept_dense``.
    inplace : bool
        Modify ``model`` itself instead of a copy.
    verbosity : {"off", "summary", "steps", "iterations"}
        ``"off"`` prints nothing; ``"summary"`` shows a progress bar over the layers and prints the
        before/after table, ``"steps"`` and ``"iterations"`` also a line per layer.

    Returns
    -------
    model : torch.nn.Module
        The model with the truncated layers.
    info : TruncationInfo
        ``info.layers[name]`` holds ``relative_norm_loss``, learnables and FLOPs before and after.

    Raises
    ------
    ValueError
        Naming the argument, for an unknown method, a structure the method does not take or a
        malformed one, ranks out of range, both or neither of ``ranks`` and ``norm_retained``,
        or a layer name that does not exist or cannot be truncated (the valid ones are listed).
    """
    check_verbosity(verbosity)
    chosen, value = _check_method(method, cut=cut, modes=modes, order=order)
    if (ranks is None) == (norm_retained is None):
        raise ValueError("ranks, norm_retained: give exactly one of them (explicit ranks, or the "
                         "fraction of each kernel's norm to keep).")
    if norm_retained is not None:
        norm_retained = check_norm_retained(norm_retained)
    if isinstance(ranks, dict) and layer_names is None:
        layers = select_kernels(model, list(ranks), exclude, argument="ranks")
    else:
        layers = select_kernels(model, layer_names, exclude)
    plans = {name: _plan(name, layer, chosen, value, _ranks_of(ranks, name, layers))
             for name, layer in layers.items()}
    npca = None if calibration is None else calibration_statistics(calibration, model, layers)
    results = {}
    for name, layer in tqdm(layers.items(), desc="truncate_kernels", unit="layer",
                            disable=verbosity == "off"):
        weighting = None if npca is None else input_weighting(npca, name)
        results[name] = _truncate(name, layer, method, chosen, *plans[name], norm_retained, weighting)
        if verbosity in ("steps", "iterations"):
            tqdm.write(_describe_step(results[name][1]))
    smaller = {name: result for name, result in results.items()
               if allow_larger or result[1].learnables_after < result[1].learnables_before}
    learnables_before = count_learnables(model)
    truncated = model if inplace else copy.deepcopy(model)
    for name, (module, _) in smaller.items():
        truncated.set_submodule(name, module)
    info = TruncationInfo(method, learnables_before, count_learnables(truncated),
                          {name: description for name, (_, description) in smaller.items()},
                          {name: description for name, (_, description) in results.items()
                           if name not in smaller})
    if verbosity != "off":
        print(info.table())
    return truncated, info


def _check_method(method, **structures) -> tuple[Method, object]:
    """The method and its structure value; other structure keywords must be absent."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, METHODS))}, got {method!r}.")
    chosen = METHODS[method]
    for keyword, value in structures.items():
        if value is not None and keyword != chosen.argument:
            takes = f"takes {chosen.argument}=" if chosen.argument else "takes no structure argument"
            raise ValueError(f"{keyword}: method={method!r} does not use it ({method!r} {takes}); "
                             "drop it or choose the method it belongs to.")
    return chosen, structures.get(chosen.argument) if chosen.argument else None


def _ranks_of(ranks, name: str, layers: dict):
    """The ranks given for layer ``name`` (``None`` when ``norm_retained`` decides)."""
    if not isinstance(ranks, dict):
        return ranks
    unknown = [key for key in ranks if key not in layers]
    if unknown:
        raise ValueError(f"ranks: {unknown[0]!r} is not among the layers to truncate "
                         f"({', '.join(layers)}).")
    if name not in ranks:
        raise ValueError(f"ranks: no entry for layer {name!r}; give ranks for every layer to truncate.")
    return ranks[name]


def _plan(name: str, layer: nn.Module, method: Method, value, ranks):
    """``(legs, structure, ranks, requested_rank)`` for one layer, checked; errors say which layer.

    An integer rank is clipped to the largest ranks of this kernel; ``requested_rank`` is that
    integer where it was clipped, else ``None``.
    """
    legs = kernel_legs(layer)
    try:
        structure = method.parse(method.default(legs) if value is None else value, legs)
        if ranks is None:
            return legs, structure, None, None
        sizes = dict(zip(legs, layer.weight.shape))
        if isinstance(ranks, tuple | list):
            given = tuple(ranks)
        elif isinstance(ranks, numbers.Real) and not isinstance(ranks, bool):
            given = tuple(min(ranks, largest) for largest in method.largest_ranks(sizes, structure))
        else:
            given = (ranks,) * method.rank_count(structure)
        clipped = ranks if given != (ranks,) * len(given) and not isinstance(ranks, tuple | list) else None
        return legs, structure, method.check_ranks(sizes, structure, given), clipped
    except ValueError as error:
        raise ValueError(f"{error} (layer {name!r}, kernel {tuple(layer.weight.shape)})") from None


def _truncate(name: str, layer: nn.Module, method_name: str, method: Method, legs: str, structure,
              ranks, requested_rank, norm_retained, weighting: InputWeighting | None):
    """The truncated layer and its :class:`LayerTruncation`."""
    kernel = layer.weight.detach().to(torch.float64)
    target = kernel if weighting is None else _mode_product(kernel, weighting.root)
    network = method.decompose(target, legs, structure, ranks=ranks, norm_retained=norm_retained)
    if weighting is not None:
        network = network.map_leg("i", weighting.inverse_root)
    error = kernel - network.contract()
    module = TruncatedConv(network_convs(network, layer, _bias(layer, error, weighting)),
                           method_name, method.name_of(structure), network.ranks)
    output_loss = None if weighting is None else \
        _ratio(weighting.output_power(error), weighting.output_power(kernel)) ** 0.5
    return module, LayerTruncation(
        name, layer_kind(layer), method_name, method.name_of(structure), network.ranks,
        _ratio(float(error.norm()), float(kernel.norm())), count_learnables(layer),
        count_learnables(module), macs_per_output_position([layer]), macs_per_output_position(module),
        output_loss, requested_rank)


def _mode_product(kernel: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``W x_i M^T``: ``W~[o, a, ...] = sum_i W[o, i, ...] M[i, a]``."""
    return torch.tensordot(kernel, matrix, dims=([1], [0])).movedim(-1, 1)


def _bias(layer: nn.Module, error: torch.Tensor, weighting: InputWeighting | None):
    """The bias of the truncated layer: ``b``, plus ``sum_k D_k mu`` with calibration data."""
    bias = None if layer.bias is None else layer.bias.detach().to(torch.float64)
    if weighting is None:
        return bias
    shift = error.reshape(*error.shape[:2], -1).sum(2) @ weighting.mean
    return shift if bias is None else bias + shift


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def _describe_step(t: LayerTruncation) -> str:
    return (f"{t.name}: {t.method} {t.structure}, ranks {t.ranks}, norm loss {t.relative_norm_loss:.4f}, "
            f"{t.learnables_before:,} -> {t.learnables_after:,} learnables, "
            f"{t.flops_before:,} -> {t.flops_after:,} MACs per output position")
