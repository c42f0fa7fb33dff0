"""Criteria: the estimated error of every option of a layer, in one unit across layers.

A criterion turns the enumerated options of one layer (or of one cell of a recurrent layer),
:class:`Candidates`, into an estimated *error* per option. The frontier of
:mod:`rankwise.ranks.frontier` keeps the options that no other beats on (learnables, error), and
the global allocation of :mod:`rankwise.ranks.allocation` minimises the sum of the layers'
errors under a learnables budget,

    min_{o_l}  sum_l e_l(o_l)   subject to   sum_l (L_l - L_l(o_l)) >= f L,

so errors must be comparable across layers and must add: across the layers of a network, and
across the cells (stacked layers, directions) of a recurrent layer, whose options are the
combinations of its cells' options.

The variance estimate of every option, its ``residual`` (the fraction of the layer's output
variance lost, see :mod:`rankwise.ranks.frontier`), is always computed and kept apart from the
error: the ``explained_variance_goal``, the infos and the trade-off curve speak in it whatever
the criterion.

Adding a criterion is one entry of :data:`CRITERIA`: a :class:`Criterion` holding its error
function ``error(npca, name, cell, candidates) -> errors`` and the metric it measures in; the
argument checks, the command line's ``--criterion`` and the measured choice read that table.

**Where the error is measured** (:mod:`rankwise.metric`). Both criteria judge a layer in a
metric ``M`` of its output, by analysing the statistics of the whitened layer ``R W``
(``R = M^(1/2)``):

- ``"variance"``: ``M = I``, except for a layer whose output feeds only an eval-mode
  BatchNorm, where ``M = diag(gamma / sigma)^2``: the error is measured after the BatchNorm, in
  the normalised space the rest of the network sees. The error of an option is the fraction
  of the layer's (normalised) output variance it loses, a relative number per layer.
- ``"loss"``: ``M = G``, the Fisher information of the layer's output per sample, gathered by
  ``NeuronPCA(..., loss_fn=...)`` (:mod:`rankwise.statistics.gradients`) and shrunk toward
  isotropy as ``(1 - a) G + a (tr G / d) I`` with ``a = d / (n + d)``, ``n`` the samples and
  ``d`` the layer's width (a Fisher estimated from few samples is trusted only as far as its
  scale). The error of an option is its estimated increase of the loss,

      E[dL] ~ 1/2 E[d^T G d] = 1/2 res_M * tr(R C_y R),

  the second-order Taylor term around the original network (the Fisher is the Hessian of the
  KL divergence to the original's outputs), in the same absolute unit for every layer: the
  allocation then removes learnables where the network's output is least sensitive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from rankwise.kinds import kind_of
from rankwise.metric import OutputMetric, batchnorm_metrics


@dataclass(frozen=True)
class Candidates:
    """Every option of one layer, or of one cell of a recurrent layer, before any filtering.

    Attributes
    ----------
    side : numpy.ndarray of int
        Codes into :data:`rankwise.ranks.options.SIDE_NAMES` (0 dense, 1 input, 2 output,
        3 both); the dense option is last.
    rank_in, rank_out : numpy.ndarray of int
        Ranks of the input and output projections (0 where that side is not projected).
    learnables : numpy.ndarray of int
        Exact learnables of each option.
    residual : numpy.ndarray of float
        Estimated fraction of the output variance of the layer (of the cell, for a recurrent
        cell) that each option loses.
    variance_share : float
        The fraction of the whole layer's output variance that ``residual`` is a fraction of:
        1 for a dense-family layer, ``V_cell / V_layer`` for a recurrent cell.
    """

    side: np.ndarray
    rank_in: np.ndarray
    rank_out: np.ndarray
    learnables: np.ndarray
    residual: np.ndarray
    variance_share: float = 1.0


ErrorFunction = Callable[[object, str, "str | None", Candidates], np.ndarray]
"""``error(npca, name, cell, candidates) -> one error per candidate``."""


def variance_error(npca, name: str, cell: str | None, candidates: Candidates) -> np.ndarray:
    """The variance criterion: the fraction of the layer's own output variance lost.

    ``e(o) = s res(o)`` with ``s`` the part's :attr:`Candidates.variance_share`, so that the
    errors of a recurrent layer's cells add up to the fraction of the layer's gate variance
    lost, ``sum_cells res_cell V_cell / V_layer``. Errors of different layers are fractions of
    different variances: their sum is the objective of the wave-1 allocation.

    Parameters
    ----------
    npca : NeuronPCA
        The statistics (unused: the residuals already hold everything this criterion needs).
    name : str
        The layer.
    cell : str or None
        The cell of a recurrent layer, ``None`` for a dense-family layer.
    candidates : Candidates

    Returns
    -------
    numpy.ndarray
        One error per candidate.
    """
    return candidates.residual * candidates.variance_share


def loss_error(npca, name: str, cell: str | None, candidates: Candidates) -> np.ndarray:
    """The loss criterion: the estimated increase of the network's loss, ``res_M tr(R C_y R) / 2``.

    ``npca`` holds the statistics whitened in the layer's Fisher metric (see the module
    docstring), so ``res`` is the fraction of ``E |R (y - mu_y)|^2 = tr(G C_y)`` an option loses.

    Raises
    ------
    ValueError
        For a recurrent layer (no gradient statistics are gathered for its gates).
    """
    if cell is not None:
        raise ValueError(f"criterion: 'loss' judges Linear and convolution layers only; layer "
                         f"{name!r} is an LSTM/GRU. Leave it out with exclude=, or use "
                         "criterion='variance'.")
    total = float(npca.spectrum(name, "output").eigenvalues.sum())
    return candidates.residual * total / 2


def batchnorm_aware_metrics(model, npca, layers: dict) -> dict:
    """The variance criterion's metrics: a dense layer feeding only an eval-mode BatchNorm is
    measured after it (:func:`rankwise.metric.batchnorm_metrics`); every other in its own output."""
    dense = {name: layer for name, layer in layers.items() if kind_of(layer).traits.batchnorm_after}
    return batchnorm_metrics(model, dense)


def fisher_metrics(model, npca, layers: dict) -> dict:
    """The loss criterion's metrics: each layer's Fisher information ``G``, shrunk toward
    isotropy by ``d / (n + d)`` (see the module docstring).

    Raises
    ------
    ValueError
        For LSTM, GRU or attention layers, or a ``npca`` gathered without ``loss_fn``.
    """
    recurrent = [name for name, layer in layers.items() if not kind_of(layer).traits.gradients]
    if recurrent:
        raise ValueError(f"criterion: 'loss' judges Linear and convolution layers only; "
                         f"{', '.join(map(repr, recurrent))} are LSTM, GRU or attention layers. Leave them "
                         "out with exclude=, or use criterion='variance'.")
    if not npca.has_gradients:
        raise ValueError("criterion: 'loss' needs the gradient statistics of the network's loss; "
                         "compute the NeuronPCA with loss_fn='kl' (classifiers), 'mse' (embeddings) "
                         "or a callable loss, or use criterion='variance'.")
    metrics = {}
    for name in layers:
        fisher = npca.fisher(name)
        metrics[name] = OutputMetric.from_gram(fisher, len(fisher) / (npca.gradient_samples + len(fisher)),
                                               npca.gradient_samples)
    return metrics


@dataclass(frozen=True)
class Criterion:
    """How an option's error is estimated: one entry of :data:`CRITERIA`.

    Attributes
    ----------
    name : str
        What users pass as ``criterion=`` (and ``--criterion``).
    error : callable
        ``error(npca, name, cell, candidates) -> numpy.ndarray``, one error per candidate, in one
        unit across layers (calling the criterion calls it).
    metrics : callable
        ``metrics(model, npca, layers) -> {name: OutputMetric}``: the layers it measures in a
        metric other than their raw output, whose statistics are whitened before the options
        are enumerated; raises a ValueError naming ``criterion`` where it cannot judge a layer.
    space : str
        The label of the space those layers' explained variances are measured in (the infos'
        ``(bn)``, ``(F)`` marks).
    needs_gradients : bool
        Whether it needs ``NeuronPCA(loss_fn=...)``: the measured choice
        (:mod:`rankwise.selection`) tries it only where they were gathered.
    """

    name: str
    error: ErrorFunction
    metrics: Callable = batchnorm_aware_metrics
    space: str = "batchnorm"
    needs_gradients: bool = False

    def __call__(self, npca, name: str, cell: str | None, candidates: Candidates) -> np.ndarray:
        return self.error(npca, name, cell, candidates)


CRITERIA: dict[str, Criterion] = {
    "variance": Criterion("variance", variance_error),
    "loss": Criterion("loss", loss_error, fisher_metrics, space="fisher", needs_gradients=True),
}
"""Every criterion by name: adding one is one entry here (the CLI, the measured choice and the
argument checks read this table)."""


def output_metrics(model, npca, layers: dict, criterion: str) -> dict:
    """The :class:`~rankwise.metric.OutputMetric` of each layer that ``criterion`` measures in a
    metric other than the identity (its :attr:`Criterion.metrics`), by name."""
    return criterion_named(criterion).metrics(model, npca, layers)


def criterion_named(name: str) -> Criterion:
    """The criterion called ``name``, or a ValueError naming ``criterion`` and the choices."""
    if name not in CRITERIA:
        raise ValueError(f"criterion: expected one of {', '.join(map(repr, CRITERIA))}, got {name!r}.")
    return CRITERIA[name]
