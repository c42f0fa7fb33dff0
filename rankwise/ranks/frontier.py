"""Each layer's options enumerated from its statistics: which side to project, at which ranks, at what cost.

The options are :class:`~rankwise.ranks.options.RankChoice` rows of a
:class:`~rankwise.ranks.options.LayerOptions` (:mod:`rankwise.ranks.options`).

Every option of a layer is described by its exact learnables
(:func:`rankwise.learnables.factored_learnables`) and by the fraction of the variance of the
layer's **output** that it loses, its *residual*, so that options of all layers and sides
compare:

- output projection at rank ``r`` (eigenvalues ``mu_1 >= mu_2 >= ...`` of the output
  covariance): ``res_out(r) = sum_{j > r} mu_j / sum_j mu_j``;
- input projection at rank ``r`` keeps the ``r`` input eigenvectors ``q_j`` (eigenvalue
  ``lambda_j``) with the largest output-space variance ``v_j = lambda_j |W q_j|^2`` (for a
  convolution ``|W q|^2 = sum_k |W_k q|^2``, positions treated as independent):
  ``res_in(r) = sum_{j > r} v_j / sum_j v_j``;
- both sides: the two errors are orthogonal (one inside ``range(P)``, one outside), so
  ``res_both <= res_in(r_in) + res_out(r_out)``, which is used as the (conservative) estimate.

An LSTM or GRU layer (see :mod:`rankwise.rnn`) is projected per cell (stacked layer and
direction) on two sides: its input, ``W_ih -> W_ih Q_in Q_in^T``, and its hidden state,
``W_hh -> W_hh Q_out Q_out^T``. Their common output space is the gate pre-activations
``z_t = W_ih x_t + W_hh h_{t-1} + b``: an eigenvector ``q_j`` (eigenvalue ``lambda_j``) of a side
read by ``W`` carries ``v_j = lambda_j |W q_j|^2`` of their variance, so, with the directions of
each side ordered by ``v_j``,

    res_in(r)  = sum_{j > r} v_j^in / V,    res_out(r) = sum_{j > r} v_j^out / V,
    V = sum_j v_j^in + sum_j v_j^out,

and projecting both sides loses ``res_in(r_in) + res_out(r_out)`` (the two terms of ``z_t``
treated as uncorrelated: an estimate). The cells of a layer are independent: its options are
the combinations of its cells' options, judged by the fraction of the layer's gate variance
lost, ``sum_cells res_cell V_cell / sum_cells V_cell``, and filtered to their frontier.

An ``nn.MultiheadAttention`` (see :mod:`rankwise.layers.attention`) has three parts, its key,
value and output projections, each a ``Linear`` map projected on its output side exactly as a
``Linear`` layer is (their residuals ``res_part(r)`` from the spectra of
:mod:`rankwise.statistics.attention`); its query projection stays dense. A part's error reaches
the attention's output through the attention weights (the key's nonlinearly, through the
softmax), so the layer's residual is estimated as the sum of its parts' residuals,
``res = res_key(r_k) + res_value(r_v) + res_out(r_o)`` (capped at 1; exact when only the output
is projected), and its options are the combinations of its parts' frontiers, filtered to their
frontier as a recurrent layer's cells are.

Each option also gets an *error* from a criterion (:mod:`rankwise.ranks.criterion`; the
variance criterion's error is the residual). Options that are beaten on both learnables and
error are dropped, which leaves each layer a *frontier*: learnables ascending, error strictly
descending, ending at the dense layer (error 0). Which enumeration a layer gets is read from its
row of :data:`rankwise.kinds.KINDS`: its ``family`` picks the entry of :data:`FRONTIERS`, its
``sides`` whether input and both-sides options exist.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from rankwise.kinds import kind_named
from rankwise.learnables import dense_learnables, factored_learnables, recurrent_learnables
from rankwise.progress import PROGRESS_DELAY_SECONDS
from rankwise.ranks.criterion import Candidates, Criterion, criterion_named, output_metrics
from rankwise.ranks.options import AttentionOptions, LayerOptions, RecurrentOptions, frontier_indices
from rankwise.ranks.tied import is_tied, tied_options
from rankwise.rnn import GATES

MAX_BOTH_INPUT_RANKS = 256  # input ranks tried in the both-sides grid


def measured_options(model, npca, layers: dict, criterion: str = "variance",
                     progress: bool = False) -> dict[str, LayerOptions]:
    """Every layer's options, judged by ``criterion`` in the metric it measures errors in.

    The statistics of each layer with a metric (:func:`rankwise.ranks.criterion.output_metrics`:
    a following BatchNorm, or the Fisher information) are whitened (:meth:`NeuronPCA.whitened`),
    one layer at a time (its whitened moments freed once its options are enumerated), and the
    options carry the metric, so that the builder (:func:`rankwise.layers.build.project_layer`)
    projects in the same space.

    Parameters
    ----------
    model : torch.nn.Module
        The network holding ``layers`` (its graph tells which layers feed a BatchNorm).
    npca : NeuronPCA
    layers : dict of str to torch.nn.Module
    criterion : {"variance", "loss"}
    progress : bool
        Show a progress bar over the layers once this takes over a second: the first use of a
        layer's statistics computes its eigen-decompositions (``O(d^3)``), its derived output
        moments and its weight Grams, which on a large network take a while.

    Returns
    -------
    dict of str to LayerOptions
    """
    criterion_named(criterion)
    metrics = output_metrics(model, npca, layers, criterion)
    options = {}
    for name in tqdm(layers, desc="rankwise: spectra and options", delay=PROGRESS_DELAY_SECONDS,
                     leave=False, disable=not progress):
        # one layer's whitened statistics at a time: freed once its options are enumerated
        if is_tied(npca.statistics(name)):  # both ends judged in their own metrics (rankwise.ranks.tied)
            options[name] = tied_options(npca, name, criterion_named(criterion))
            continue
        analysed = npca.whitened({name: metrics[name]}, layers) if name in metrics else npca
        options[name] = layer_options(analysed, name, criterion)
        options[name].metric = metrics.get(name)
        if name in metrics:
            options[name].space = criterion_named(criterion).space
    return options


def layer_options(npca, name: str, criterion: str = "variance") -> LayerOptions:
    """Enumerate the options of layer ``name`` from its statistics and keep their frontier.

    Parameters
    ----------
    npca : NeuronPCA
        Statistics holding layer ``name``.
    name : str
        The layer's qualified name.
    criterion : str
        The entry of :data:`rankwise.ranks.criterion.CRITERIA` giving each option's error.

    Returns
    -------
    LayerOptions
        A :class:`RecurrentOptions` for an LSTM or GRU layer. Input and both-sides options
        exist only where the layer's kind analyses its input side (not for ``Linear`` layers,
        where output projection is optimal; see :mod:`rankwise.kinds`).
    """
    kind = kind_named(npca.statistics(name, settle=False).kind)
    return FRONTIERS[kind.family](npca, name, kind, criterion_named(criterion))


def _dense_options(npca, name: str, kind, criterion: Criterion) -> LayerOptions:
    """The frontier of a ``Linear`` or convolution layer ``y = W x + b``."""
    stats = npca.statistics(name, settle="input" in kind.sides)  # a Linear's output Grams: not needed
    out_spec = npca.spectrum(name, "output")
    res_out = _residual_curve(out_spec.eigenvalues)
    in_c, out_c, k = (stats.in_channels, stats.out_channels, stats.kernel_numel)
    input_basis = input_mean = res_in = None
    if "input" in kind.sides:
        in_spec = npca.spectrum(name, "input")
        input_variance, input_basis = _ranked_directions(in_spec, stats.weight_gram_input)
        res_in, input_mean = _residual_curve(input_variance), in_spec.mean
    candidates = _all_options(res_in, res_out, partial(factored_learnables, in_c, out_c, k),
                              dense_learnables(in_c, out_c, k, stats.bias))
    error = criterion(npca, name, None, candidates)
    keep = frontier_indices(candidates.learnables, error)
    side_residuals = {"output": res_out} if res_in is None else {"input": res_in, "output": res_out}
    return LayerOptions(name, candidates.side[keep], candidates.rank_in[keep], candidates.rank_out[keep],
                        candidates.learnables[keep], candidates.residual[keep], error[keep],
                        input_basis, input_mean, out_spec.eigenvectors, out_spec.mean, side_residuals)


def _ranked_directions(spectrum, weight_gram: torch.Tensor):
    """``(v, Q)``: the output-space variances ``v_j = lambda_j q_j^T W^T W q_j``, descending,
    and the eigenvectors ``q_j`` in that order."""
    v = spectrum.eigenvectors
    variance = spectrum.eigenvalues * torch.einsum("ij,ik,kj->j", v, weight_gram, v)
    order = torch.argsort(variance, descending=True)
    return variance[order], v[:, order]


def _recurrent_options(npca, name: str, kind, criterion: Criterion) -> RecurrentOptions:
    """The options of a recurrent layer: every cell's frontier, then their combinations."""
    cells = npca.statistics(name).cells
    ranked = {cell: _cell_directions(npca, name, cell) for cell in cells}
    total = sum(_gate_variance(directions) for directions in ranked.values())
    frontiers = [_cell_options(npca, name, cell, ranked[cell], total, criterion) for cell in cells]
    picks, learnables, lost, error = _combine(frontiers)
    residual = lost / total if total > 0 else np.zeros(len(lost))

    def per_cell(field_name):
        return np.stack([getattr(opts, field_name)[picks[:, k]]
                         for k, (opts, _) in enumerate(frontiers)], 1)

    def by_cell(field_name):
        return {cell: getattr(opts, field_name) for cell, (opts, _) in zip(cells, frontiers)}

    return RecurrentOptions(name, per_cell("side"), per_cell("rank_in"), per_cell("rank_out"),
                            learnables, residual, error, by_cell("input_basis"), by_cell("input_mean"),
                            by_cell("output_basis"), by_cell("output_mean"),
                            frontiers[0][0].side_residuals if len(cells) == 1 else {}, cells=tuple(cells))



def _attention_options(npca, name: str, kind, criterion: Criterion) -> AttentionOptions:
    """The options of an attention layer: each part's output-side frontier, then their combinations."""
    stats = npca.statistics(name)
    frontiers = [(_part_options(npca, name, part, criterion), 1.0) for part in stats.cells]
    picks, learnables, lost, error = _combine(frontiers)
    query = dense_learnables(stats.embed_dim, stats.embed_dim, 1, True)

    def per_part(field_name):
        return np.stack([getattr(opts, field_name)[picks[:, k]] for k, (opts, _) in enumerate(frontiers)], 1)

    return AttentionOptions(name, per_part("side"), per_part("rank_in"), per_part("rank_out"), learnables + query,
                            np.minimum(lost, 1.0), error, None, None,
                            {part: opts.output_basis for part, (opts, _) in zip(stats.cells, frontiers)},
                            {part: opts.output_mean for part, (opts, _) in zip(stats.cells, frontiers)},
                            cells=tuple(stats.cells))


def _part_options(npca, name: str, part: str, criterion: Criterion) -> LayerOptions:
    """One part's frontier: the output projections of the ``Linear`` map ``in -> E``, then dense."""
    stats = npca.statistics(name)
    spectrum = npca.spectrum(name, "output", part)
    res_out = _residual_curve(spectrum.eigenvalues)
    width = {"key": stats.kdim, "value": stats.vdim, "out": stats.embed_dim}[part]
    candidates = _all_options(None, res_out, partial(factored_learnables, width, stats.embed_dim, 1),
                              dense_learnables(width, stats.embed_dim, 1, True))
    error = criterion(npca, name, part, candidates)
    keep = frontier_indices(candidates.learnables, error)
    return LayerOptions(name, candidates.side[keep], candidates.rank_in[keep], candidates.rank_out[keep],
                        candidates.learnables[keep], candidates.residual[keep], error[keep], None, None,
                        spectrum.eigenvectors, spectrum.mean, {"output": res_out})


def _cell_directions(npca, name: str, cell: str) -> dict:
    """Per side of one cell: its spectrum and its directions ranked by gate variance ``(v, Q)``."""
    stats = npca.statistics(name)
    spectra = {side: npca.spectrum(name, side, cell) for side in ("input", "output")}
    return {side: (spectra[side], _ranked_directions(spectra[side], stats.weight_gram(side, cell)))
            for side in spectra}


def _gate_variance(directions: dict) -> float:
    """``V`` of one cell: the gate variance carried by both its sides."""
    return float(sum(ranked[0].sum() for _, ranked in directions.values()))


def _cell_options(npca, name: str, cell: str, directions: dict, layer_total: float,
                  criterion: Criterion) -> tuple[LayerOptions, float]:
    """One cell's frontier and its gate variance ``V``.

    Its residuals are fractions of ``V``; its candidates' ``variance_share`` is
    ``V / layer_total``, so that the variance criterion's errors are fractions of the layer's
    gate variance and add across cells.
    """
    stats = npca.statistics(name)
    total = _gate_variance(directions)
    side_residuals = {side: _residual_curve(ranked[0], total) for side, (_, ranked) in directions.items()}
    count = partial(recurrent_learnables, stats.cell_input_size(cell), stats.hidden_size,
                    GATES[stats.kind], stats.bias)
    candidates = _all_options(side_residuals["input"], side_residuals["output"], count, count(None, None),
                              total / layer_total if layer_total > 0 else 0.0)
    error = criterion(npca, name, cell, candidates)
    keep = frontier_indices(candidates.learnables, error)
    (in_spec, (_, in_basis)), (out_spec, (_, out_basis)) = directions["input"], directions["output"]
    return LayerOptions(name, candidates.side[keep], candidates.rank_in[keep], candidates.rank_out[keep],
                        candidates.learnables[keep], candidates.residual[keep], error[keep],
                        in_basis, in_spec.mean, out_basis, out_spec.mean, side_residuals), total


def _combine(frontiers: list[tuple[LayerOptions, float]]):
    """The frontier of the combinations of independent cells' options.

    A combination's learnables, lost variance (``residual V``) and error are the sums over the
    cells. Returns ``(picks, learnables, lost, error)``: ``picks[i, k]`` is the option of cell
    ``k`` in combination ``i``; the all-dense combination is last.
    """
    picks, learnables, lost, error = np.zeros((1, 0), int), np.zeros(1, int), np.zeros(1), np.zeros(1)
    for options, variance in frontiers:
        count = len(options.learnables)
        learnables = (learnables[:, None] + options.learnables[None, :]).ravel()
        lost = (lost[:, None] + variance * options.residual[None, :]).ravel()
        error = (error[:, None] + options.error[None, :]).ravel()
        picks = np.concatenate([np.repeat(picks, count, 0),
                                np.tile(np.arange(count), len(picks))[:, None]], 1)
        keep = frontier_indices(learnables, error)
        picks, learnables, lost, error = picks[keep], learnables[keep], lost[keep], error[keep]
    return picks, learnables, lost, error


def _residual_curve(variances: torch.Tensor, total: float | None = None) -> np.ndarray:
    """``res[r - 1] = sum_{j > r} v_j / total`` for ``r = 1..d``, ``total = sum_j v_j`` by
    default (0 when the total is zero)."""
    v = variances.detach().cpu().numpy().astype(np.float64)
    total = v.sum() if total is None else total
    if total <= 0:
        return np.zeros(len(v))
    return np.clip((v.sum() - np.cumsum(v)) / total, 0.0, 1.0)


def _all_options(res_in, res_out, count, dense: int, variance_share: float = 1.0) -> Candidates:
    """Every option (side code, rank_in, rank_out, learnables, residual), dense last.

    ``res_in`` and ``res_out`` are the residual curves of each side alone (``res_in`` is
    ``None`` where the input side is not analysed), ``count(rank_in, rank_out)`` the learnables
    of a factored form (``None`` for a side not projected) and ``dense`` those of the dense layer.
    """
    r_out = np.arange(1, len(res_out) + 1)
    parts = [(2, 0 * r_out, r_out, count(None, r_out), res_out)]
    if res_in is not None:
        in_c = len(res_in)
        r_in = np.arange(1, in_c + 1)
        grid_in = np.unique(np.linspace(1, in_c, min(in_c, MAX_BOTH_INPUT_RANKS)).round().astype(int))
        both_in, both_out = (a.ravel() for a in np.meshgrid(grid_in, r_out, indexing="ij"))
        parts += [(1, r_in, 0 * r_in, count(r_in, None), res_in),
                  (3, both_in, both_out, count(both_in, both_out),
                   np.minimum(res_in[both_in - 1] + res_out[both_out - 1], 1.0))]
    parts.append((0, np.zeros(1, int), np.zeros(1, int), np.array([dense]), np.zeros(1)))
    columns = (np.concatenate([np.broadcast_to(np.asarray(p[i]), p[1].shape) for p in parts])
               for i in range(5))
    return Candidates(*columns, variance_share=variance_share)


def _embedding_options(npca, name: str, kind, criterion: Criterion) -> LayerOptions:
    """A table's options: a ``Linear`` layer's on one-hot tokens, or a tied pair's (:mod:`rankwise.ranks.tied`)."""
    if is_tied(npca.statistics(name)):
        return tied_options(npca, name, criterion)
    return _dense_options(npca, name, kind, criterion)


FRONTIERS = {"dense": _dense_options, "embedding": _embedding_options, "recurrent": _recurrent_options,
             "attention": _attention_options}
