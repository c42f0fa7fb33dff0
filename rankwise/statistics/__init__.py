"""Per-kind activation statistics, gathered by :class:`rankwise.NeuronPCA`.

Each family of :data:`rankwise.kinds.KINDS` has one statistics class, chosen through
``kind_of(layer).family`` (:data:`FAMILIES`):

- ``"dense"``: :class:`~rankwise.statistics.dense.LayerStatistics` (``Linear``, convolutions);
- ``"embedding"``: :class:`~rankwise.statistics.embedding.EmbeddingStatistics` (``Embedding``);
- ``"recurrent"``: :class:`~rankwise.statistics.recurrent.RecurrentStatistics` (LSTM, GRU);
- ``"attention"``: :class:`~rankwise.statistics.attention.AttentionStatistics`
  (``MultiheadAttention``).

Every class answers the same questions: ``for_layer(layer, kind)`` (empty statistics),
``hook(name, layer)`` (a forward hook that adds one call's rows), ``a + b`` (statistics of the
union of two calibration sets: moments add up), ``spectra_keys()`` and ``spectrum(side, cell,
regularization)`` (regularised principal components, :mod:`rankwise.statistics.spectra`),
``resolve_request(name, side, cell)``, ``width``, ``shape`` and ``input``. Statistics are
dataclasses of plain tensors, :class:`~rankwise.moments.Moments` and lists of those, so
:func:`to_plain` / :func:`from_plain` write and read them without pickling code.
"""

from __future__ import annotations

from dataclasses import fields

from torch import nn

from rankwise.kinds import kind_named, kind_of
from rankwise.moments import Moments
from rankwise.statistics.attention import AttentionStatistics
from rankwise.statistics.dense import LayerStatistics
from rankwise.statistics.embedding import EmbeddingStatistics
from rankwise.statistics.recurrent import RecurrentStatistics

FAMILIES = {"dense": LayerStatistics, "embedding": EmbeddingStatistics, "recurrent": RecurrentStatistics,
            "attention": AttentionStatistics}
"""The statistics class of each family of :data:`rankwise.kinds.KINDS`."""

Statistics = LayerStatistics | EmbeddingStatistics | RecurrentStatistics | AttentionStatistics


def statistics_for(layer: nn.Module) -> Statistics:
    """Empty statistics for ``layer``, of the class its kind's family calls for."""
    kind = kind_of(layer)
    return FAMILIES[kind.family].for_layer(layer, kind.name)


def to_plain(stats: Statistics) -> dict:
    """``stats`` as a dict of tensors, numbers, strings and lists (each Moments as a dict)."""
    return {f.name: _plain(getattr(stats, f.name)) for f in fields(stats)}


def from_plain(plain: dict) -> Statistics:
    """Statistics from their :func:`to_plain` form."""
    family = FAMILIES[kind_named(plain["kind"]).family]
    return family(**{name: _restored(value) for name, value in plain.items()})


def moment_tensors(stats: Statistics) -> list:
    """Every tensor of ``stats`` that is a sum over observations (what a process group sums):
    the ``count``, ``sum``, ``square_sum`` and ``outer`` of each of its :class:`Moments`."""
    found = []
    for f in fields(stats):
        value = getattr(stats, f.name)
        for moments in value if isinstance(value, list) else [value]:
            if isinstance(moments, Moments):
                found += moments.tensors()
    return found


def _plain(value):
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Moments):
        return {f.name: getattr(value, f.name) for f in fields(value)}
    return value


def _restored(value):
    if isinstance(value, list):
        return [_restored(v) for v in value]
    if isinstance(value, dict):
        return Moments(**value)
    return value


__all__ = ["AttentionStatistics", "EmbeddingStatistics", "FAMILIES", "LayerStatistics", "RecurrentStatistics", "Statistics", "from_plain",
           "moment_tensors", "statistics_for", "to_plain"]
