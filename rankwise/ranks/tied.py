"""The options of a tied token table and output head, judged as one unit on both ends.

A table ``E`` (``V x d``) tied to a head (:mod:`rankwise.ties`) serves two ends: the lookup
``e_t = E[t]`` and the logits ``z = E x + b``. Its factored form (:mod:`rankwise.layers.tied`)
is ``E' = E P P^T``, ``P`` orthonormal ``d x r`` (write ``Pi = P P^T``, ``I - Pi`` the
discarded directions), which changes

- a looked-up row by ``(I - Pi) e_t``;
- the logits by ``E (I - Pi) x``.

Both errors have the same form. For a symmetric weight ``K`` of the change and ``S`` the
second moment of the vectors it acts on (not centred: the factored table has no bias to keep a
mean in), the expected error is

    e(Pi) = E[ v^T (I - Pi) K (I - Pi) v ] = tr( K (I - Pi) S (I - Pi) ),

with, per criterion (:mod:`rankwise.ranks.criterion`),

=============  ============================================  ====================================
end            ``"variance"``: squared change                ``"loss"``: 1/2 the loss increase
=============  ============================================  ====================================
lookup         ``K = I``, ``S = M = E[e_t e_t^T]``           ``K = F_e``, the Fisher of the
               (the looked-up rows, one per token)           table's output, ``S = M``
head           ``K = E^T E`` (``|E u|^2``: the logits),      ``K = F_x``, the Fisher of the head's
               ``S = S_x = E[x x^T]`` (the head's input)      input, ``S = S_x``
=============  ============================================  ====================================

(``F_x = E^T F_z E``: the head is linear, so the Fisher of its input carries that of the
logits, ``g_z^T E (I - Pi) x = g_x^T (I - Pi) x``; both Fishers per sample, shrunk toward
isotropy as the loss criterion's are.) For a basis ``U`` (``d x d``, orthonormal) whose first
``r`` columns are ``P``, with ``H = (U^T K U) o (U^T S U)`` (elementwise product),

    e(r) = sum_{i > r, j > r} H_ij,

so one ``O(d^2)`` suffix sum gives every rank's exact error for both ends. The basis is the
eigenvectors of ``C = sum_ends w (K S + S K) / 2`` by descending eigenvalue, ``w = 1 / e(0)``
for the variance criterion (each end's error as a fraction of its total) and ``w = 1`` for the
loss criterion (both in loss units): where ``K`` and ``S`` of each end commute (``K = I`` for
the lookup) this ordering is the optimal one, ``e(r) = sum_{j > r} k_j s_j``; otherwise it is a
heuristic whose errors are still exact.

The options are ``r = 1 .. d`` at ``V r + r d`` learnables (``V d`` dense). Each option's
*error* is the sum of both ends' (the variance criterion: ``e_lookup / e_lookup(0) + e_head /
e_head(0)``, two layers' fractions, as two untied layers would add; the loss criterion:
``(e_lookup + e_head) / 2``), its *residual* the mean of the two fractions (what an explained
variance goal and the infos read).
"""

from __future__ import annotations

import numpy as np
import torch

from rankwise.metric import OutputMetric
from rankwise.ranks.criterion import Criterion
from rankwise.ranks.options import SIDE_NAMES, TiedOptions, frontier_indices
from rankwise.statistics.calibration import HEAD_INPUT


def is_tied(stats) -> bool:
    """Whether ``stats`` are a tied table's (they gathered the head's input too)."""
    return getattr(stats, "head_input", None) is not None


def tied_options(npca, name: str, criterion: Criterion) -> TiedOptions:
    """The frontier of the tied pair whose table is ``name`` (see the module docstring)."""
    stats = npca.statistics(name)
    ends = _ends(npca, name, stats, criterion.needs_gradients)
    weights = [1.0 if criterion.needs_gradients else 1.0 / max(_trace(k, s), 1e-300) for k, s in ends]
    combined = sum(w * (k @ s + s @ k) / 2 for w, (k, s) in zip(weights, ends))
    eigenvalues, vectors = torch.linalg.eigh(combined)
    basis = vectors[:, torch.argsort(eigenvalues, descending=True)]
    errors = [_error_curve(basis, k, s) for k, s in ends]  # e(r), r = 1..d
    fractions = [e / max(e_total, 1e-300) for e, e_total in zip(errors, (_trace(k, s) for k, s in ends))]
    residual = np.append(np.clip((fractions[0] + fractions[1]) / 2, 0.0, 1.0), 0.0)
    error = np.append((errors[0] + errors[1]) / 2 if criterion.needs_gradients else fractions[0] + fractions[1], 0.0)
    vocabulary, width = stats.in_channels, stats.out_channels
    ranks = np.arange(1, width + 1)
    learnables = np.append(ranks * (vocabulary + width), vocabulary * width)
    keep = frontier_indices(learnables, error)
    side = np.where(np.arange(width + 1) < width, SIDE_NAMES.index("output"), 0)
    rank_out = np.append(ranks, 0)
    return TiedOptions(name, side[keep], np.zeros(len(keep), int), rank_out[keep], learnables[keep], residual[keep],
                       error[keep], None, None, basis, torch.zeros(width, dtype=basis.dtype, device=basis.device),
                       {"output": residual[:-1]}, space="fisher" if criterion.needs_gradients else "output",
                       head=stats.head)


def _ends(npca, name: str, stats, loss: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(K, S) of the lookup, (K, S) of the head]`` (module docstring's table), float64."""
    lookup = stats.output.outer / stats.output.count
    head = stats.head_input.outer / stats.head_input.count
    if loss:
        return [(_fisher(npca, name), lookup), (_fisher(npca, name + HEAD_INPUT), head)]
    return [(torch.eye(len(lookup), dtype=lookup.dtype, device=lookup.device), lookup),
            (stats.weight_gram_output.to(lookup), head)]


def _fisher(npca, key: str) -> torch.Tensor:
    """The Fisher information ``key`` holds, shrunk as the loss criterion shrinks it (``G = R^T R``)."""
    fisher = npca.fisher(key)
    root = OutputMetric.from_gram(fisher, len(fisher) / (npca.gradient_samples + len(fisher))).root
    return root.T @ root


def _trace(k: torch.Tensor, s: torch.Tensor) -> float:
    """``e(0) = tr(K S)``: the error of discarding every direction."""
    return float((k * s).sum())


def _error_curve(basis: torch.Tensor, k: torch.Tensor, s: torch.Tensor) -> np.ndarray:
    """``e(r) = sum_{i > r, j > r} H_ij`` for ``r = 1 .. d``, ``H = (U^T K U) o (U^T S U)``."""
    h = (basis.T @ k @ basis) * (basis.T @ s @ basis)
    suffix = h.flip((0, 1)).cumsum(0).cumsum(1).flip((0, 1))
    diagonal = torch.diagonal(suffix).cpu().numpy()
    return np.clip(np.append(diagonal[1:], 0.0), 0.0, None)
