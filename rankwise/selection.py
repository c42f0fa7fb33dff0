"""Measured choices: candidate compressions scored on held-out batches, the best one kept.

No single criterion, allocation or shrinkage wins on every network: an allocation driven by
estimated errors collapses where those estimates do not compare across layers, a uniform ratio
where layers differ, statistics from thin or shifted data where the weights' own spectrum would
have held. So under a ``learnables_reduction_goal`` (or a FLOPs or latency goal) the library
does not assume; it measures.
With the statistics of the fitted calibration batches only (:meth:`NeuronPCA.fitted`, the
held-out batches of :mod:`rankwise.holdout` never seen), each *candidate*

- criterion: ``"variance"`` and, where gradient statistics exist, ``"loss"``
  (:mod:`rankwise.ranks.criterion`);
- allocation: ``"global"`` (least total estimated error) and ``"uniform"`` (one ratio for every
  layer), :mod:`rankwise.ranks.allocation`;
- shrinkage ``alpha`` of the covariances toward the weights' spectrum
  (:mod:`rankwise.statistics.spectra`): the NeuronPCA's own (``"auto"``: ``d / (n + d)``), and
  ``alpha = 1``, the data-free truncated SVD of every weight (with the variance criterion); then
  the best pair of criterion and allocation at ``alpha = 1/2``,

is built at the goal, run on the held-out batches, and scored by the divergence of its outputs
from the original's (:mod:`rankwise.divergence`: KL of logits, relative error elsewhere, or the
user's ``score_fn``). The lowest score wins; its decisions are then made again on the statistics
of every calibration batch. Explicit ``criterion=`` / ``allocation=`` settings restrict the
candidates to them. The cost: one forward pass over the held-out batches per candidate (and one
for the original), one build per candidate, and the spectra of each (criterion, shrinkage).

Under an ``explained_variance_goal`` candidates would differ in size, not only in quality, so
nothing is measured: the goal is met in its own unit, the variance criterion.
"""

from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass, field

from torch import nn

from rankwise.divergence import HeldOutScorer
from rankwise.goals import Goal
from rankwise.ranks import CRITERIA, SequenceBound, choose_ranks, measured_options

ALLOCATIONS = ("global", "uniform")
DATA_FREE = 1.0
"""The shrinkage of the data-free candidate: the weights' own spectrum."""
MIDDLE_SHRINKAGE = 0.5


@dataclass(frozen=True)
class Candidate:
    """One way of deciding: a criterion, an allocation and a shrinkage (``"auto"`` or a float)."""

    criterion: str
    allocation: str
    regularization: object = "auto"

    @property
    def label(self) -> str:
        shrinkage = "data-free (weights' spectrum)" if self.regularization == DATA_FREE \
            else f"shrinkage {self.regularization}"
        return f"criterion={self.criterion}, allocation={self.allocation}, {shrinkage}"


@dataclass
class CandidateScore:
    """A candidate's measured score on the held-out batches (lower is better; ``None`` when it
    could not be built, ``note`` says why) and the learnables it left."""

    candidate: Candidate
    score: float | None
    learnables_after: int | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return {"criterion": self.candidate.criterion, "allocation": self.candidate.allocation,
                "regularization": self.candidate.regularization, "score": self.score,
                "learnables_after": self.learnables_after, "note": self.note}


@dataclass
class MeasuredChoice:
    """The outcome of :func:`choose_by_measurement`: the candidate kept, every score, why."""

    chosen: Candidate
    scores: list = field(default_factory=list)
    score_name: str = ""
    reason: str = ""
    seconds: float = field(default=0.0, compare=False)

    @classmethod
    def from_dict(cls, plain: dict) -> "MeasuredChoice":
        """The choice from its ``dataclasses.asdict`` form (as :func:`rankwise.save` keeps it)."""
        scores = [CandidateScore(**{**s, "candidate": Candidate(**s["candidate"])}) for s in plain["scores"]]
        return cls(**{**plain, "chosen": Candidate(**plain["chosen"]), "scores": scores})


def first_candidates(criterion: str, allocation: str, regularization, has_gradients: bool) -> list[Candidate]:
    """The first round of candidates (see the module docstring) under the user's settings."""
    criteria = [c.name for c in CRITERIA.values() if has_gradients or not c.needs_gradients] \
        if criterion == "auto" else [criterion]
    allocations = list(ALLOCATIONS) if allocation == "auto" else [allocation]
    first = [Candidate(c, a, regularization) for c, a in itertools.product(criteria, allocations)]
    if "variance" in criteria and regularization != DATA_FREE:
        first += [Candidate("variance", a, DATA_FREE) for a in allocations]
    return first


def fallback(criterion: str, allocation: str, has_gradients: bool, regularization) -> Candidate:
    """The documented choice when nothing can be measured: ``"loss"`` where gradient statistics
    exist (else ``"variance"``), ``"global"``, the NeuronPCA's shrinkage; explicit settings kept."""
    return Candidate(("loss" if has_gradients else "variance") if criterion == "auto" else criterion,
                     "global" if allocation == "auto" else allocation, regularization)


def choose_by_measurement(model: nn.Module, npca, layers: dict, goal: Goal, build,
                          criterion: str = "auto", allocation: str = "auto", forward_fn=None,
                          score_fn="auto", progress: bool = False, cost=None) -> MeasuredChoice:
    """Build every candidate on the fitted statistics, score it on the held-out batches, keep the best.

    Parameters
    ----------
    model : torch.nn.Module
        The original network (never modified: every candidate is built on a copy).
    npca : NeuronPCA
        Statistics with held-out batches (:attr:`NeuronPCA.validation_batches`).
    layers : dict of str to torch.nn.Module
        The layers decided on.
    goal : Goal
        A learnables or FLOPs reduction goal (see the module docstring).
    build : callable
        ``build(options, choices) -> (compressed model, ProjectionInfo)`` on a copy of ``model``
        (:func:`rankwise.projection.build_projected`).
    criterion, allocation : str
        ``"auto"`` or the user's explicit setting.
    forward_fn : callable, optional
        Runs a held-out batch.
    score_fn : "auto", "kl", "relative_error" or callable
        How outputs are compared (:class:`rankwise.divergence.HeldOutScorer`).
    progress : bool
        Print one line per candidate.
    cost : FlopBudget or LatencyBudget, optional
        The cost budget of a FLOPs or latency goal (:func:`rankwise.ranks.choose_ranks`).

    Returns
    -------
    MeasuredChoice
    """
    start = time.perf_counter()
    scorer = HeldOutScorer(model, npca.validation_batches, forward_fn, score_fn)
    learnables = npca.network_learnables
    options_of = {}  # the last (criterion, shrinkage)'s statistics and options: candidates come grouped

    def measure(candidate: Candidate) -> CandidateScore:
        try:
            key = (candidate.criterion, candidate.regularization)
            if key not in options_of:
                options_of.clear()  # one set of spectra and bases in memory at a time
                fitted = npca.with_regularization(candidate.regularization).fitted()
                options_of[key] = (fitted, measured_options(model, fitted, layers, candidate.criterion))
            fitted, options = options_of[key]
            choices, _ = choose_ranks(options, goal, learnables, "off", candidate.allocation, cost)
            choices = SequenceBound(layers, options, fitted, goal)(choices)
            built, info = build(options, choices)
            result = CandidateScore(candidate, scorer.score(built), info.learnables_after)
        except ValueError as error:
            result = CandidateScore(candidate, None, note=str(error).splitlines()[0][:200])
        if progress:
            print(f"  candidate {candidate.label}: " + (f"{scorer.name} {result.score:.4g}"
                                                        if result.score is not None else result.note))
        return result

    if progress:
        print(f"rankwise: measuring candidates on {len(npca.validation_batches)} held-out batches")
    scores = [measure(c) for c in first_candidates(criterion, allocation, npca.regularization, npca.has_gradients)]
    best = _best(scores)
    if best is not None and best.candidate.regularization not in (MIDDLE_SHRINKAGE, DATA_FREE):
        scores.append(measure(Candidate(best.candidate.criterion, best.candidate.allocation, MIDDLE_SHRINKAGE)))
        best = _best(scores)
    if best is None:
        raise ValueError("criterion: no candidate compression could be built: "
                         + "; ".join(f"{s.candidate.label}: {s.note}" for s in scores))
    others = [s for s in scores if s.score is not None and s is not best]
    runner_up = min(others, key=lambda s: s.score, default=None)
    reason = (f"lowest {scorer.name} on {len(npca.validation_batches)} held-out batches: {best.score:.4g}"
              + (f" (next: {runner_up.candidate.label}, {runner_up.score:.4g})" if runner_up else ""))
    seconds = time.perf_counter() - start
    if progress:
        print(f"rankwise: measuring {len(scores)} candidates took {seconds:.1f} s")
    return MeasuredChoice(best.candidate, scores, scorer.name, reason, seconds)


def _best(scores: list[CandidateScore]) -> CandidateScore | None:
    """The lowest score (the first listed among equals), ``None`` when none was measured."""
    measured = [s for s in scores if s.score is not None]
    return min(measured, key=lambda s: s.score) if measured else None


def how_to_decide(model: nn.Module, npca, layers: dict, goal: Goal, build,
                  criterion: str = "auto", allocation: str = "auto", forward_fn=None, score_fn="auto",
                  verbosity: str = "off", cost=None) -> tuple[Candidate, MeasuredChoice | None]:
    """The candidate to decide with, and the measurement behind it (``None`` when there was
    nothing to choose): measured on the held-out batches (:func:`choose_by_measurement`) under a
    learnables, FLOPs or latency goal when ``criterion`` or ``allocation`` is ``"auto"``; else what was set (the
    variance criterion and the global allocation for ``"auto"`` under an explained variance
    goal); the documented :func:`fallback`, with a warning, when nothing was held out."""
    if not goal.is_budget or "auto" not in (criterion, allocation):
        return fallback("variance" if criterion == "auto" else criterion, allocation, False,
                        npca.regularization), None
    if not npca.validation_batches:
        chosen = fallback(criterion, allocation, npca.has_gradients, npca.regularization)
        warnings.warn(f"validation: no calibration batch was held out ({npca.num_batches} batch(es); "
                      "validation=None; or a NeuronPCA saved before held-out batches were kept), so the "
                      f"candidate compressions could not be measured and the fallback {chosen.label} was "
                      "used. Pass two or more batches, or held-out batches as validation=.",
                      UserWarning, stacklevel=4)
        return chosen, MeasuredChoice(chosen, reason="nothing held out to measure on: the documented fallback")
    measured = choose_by_measurement(model, npca, layers, goal, build, criterion, allocation, forward_fn,
                                     score_fn, progress=verbosity in ("steps", "iterations"), cost=cost)
    return measured.chosen, measured
