"""Held-out calibration batches: the part of the user's data that checks the decisions.

A choice the library makes for the user (criterion, allocation, shrinkage: :mod:`rankwise.selection`)
is measured on calibration batches that the statistics it is made from never saw. With
``validation="auto"`` (the default) every fourth batch is held out, starting with the second:
batch ``i`` (counting from 0) is held out when ``i % 4 == 1``, so two or more batches always hold
one out, and 4 of 16 batches are held out (``validation=f`` holds out every ``round(1/f)``-th batch
the same way). The split depends only on the batches' order, so the same data gives the same
choice. ``validation=batches`` (a list, a ``DataLoader``) gives separate held-out batches and every
calibration batch is fitted; ``validation=None`` holds nothing out (no measured choice).

The held-out batches are kept (as given) for the scoring passes; the statistics are gathered
twice in one pass over the data, once over the fitted part and once over the held-out part, and
added up afterwards (moments add), so the decisions are refitted on every batch at no further
calibration cost.
"""

from __future__ import annotations

import numbers

import torch

from rankwise.batches import as_batches, batch_count

VALIDATION_PERIOD = 4
"""``validation="auto"`` holds out batch ``i`` when ``i % VALIDATION_PERIOD == 1``."""
SAVABLE = (torch.Tensor, str, int, float, bool, type(None))


def check_validation(validation) -> None:
    """``validation`` must be ``"auto"``, ``None``, a fraction in ``(0, 0.5]`` or an iterable of batches."""
    if validation is None or isinstance(validation, str) and validation == "auto":
        return
    if isinstance(validation, numbers.Real) and not isinstance(validation, bool):
        if 0.0 < validation <= 0.5:
            return
    elif not isinstance(validation, str | bool) and hasattr(validation, "__iter__"):
        return
    raise ValueError(f"validation: expected 'auto' (every {VALIDATION_PERIOD}th calibration batch held out), "
                     "a fraction in (0, 0.5] of the batches to hold out, separate held-out batches (a "
                     f"list or DataLoader), or None (nothing held out); got {validation!r}.")


class HeldOutSplit:
    """The calibration batches split into a fitted part (iterable, re-iterable) and held-out batches.

    Iterating the split yields the fitted batches and, on the first iteration, keeps the
    held-out ones in :attr:`held_out` (separate batches are listed at once).

    Parameters
    ----------
    data : iterable or torch.Tensor
        The calibration batches.
    validation : "auto", float or iterable
        See the module docstring (not ``None``).
    max_batches : int, optional
        Consider only the first ``max_batches`` batches of ``data``.
    """

    def __init__(self, data, validation, max_batches: int | None = None):
        self.data, self.max_batches = as_batches(data), max_batches
        self.separate = not isinstance(validation, str | numbers.Real)
        self.period = 0 if self.separate else VALIDATION_PERIOD if validation == "auto" \
            else max(2, round(1 / validation))
        self.held_out = HeldOutBatches(as_batches(validation)) if self.separate else HeldOutBatches(split=self)
        self._collected = self.separate

    def is_held_out(self, index: int) -> bool:
        return self.period > 0 and index % self.period == 1

    def original_index(self, position: int) -> int:
        """The index in the user's data of the fitted batch at ``position``."""
        if self.period == 0:
            return position
        kept = [offset for offset in range(self.period) if offset != 1]
        return position // len(kept) * self.period + kept[position % len(kept)]

    def __iter__(self):
        for index, batch in enumerate(self.data):
            if self.max_batches is not None and index >= self.max_batches:
                break
            if not self.is_held_out(index):
                yield batch
            elif not self._collected:
                self.held_out.append(batch)
        self._collected = True

    def __len__(self) -> int:
        total = batch_count(self.data)
        if total is None:
            raise TypeError("the calibration batches have no length")
        total = total if self.max_batches is None else min(total, self.max_batches)
        return total - sum(map(self.is_held_out, range(total)))


class HeldOutBatches(list):
    """The held-out batches, which know their index in the user's data (``split``: the split
    they were taken from; ``None`` for separate batches, indexed from 0)."""

    def __init__(self, batches=(), split: HeldOutSplit | None = None):
        super().__init__(batches if split is None else ())
        self.split = split

    def original_index(self, position: int) -> int:
        return position if self.split is None else position * self.split.period + 1


def savable(batches: list) -> bool:
    """Whether ``batches`` hold only tensors, numbers and strings in tuples, lists and dicts
    (what :meth:`NeuronPCA.save` can write and read back without unpickling code)."""
    def plain(item) -> bool:
        if isinstance(item, tuple | list):
            return all(map(plain, item))
        if isinstance(item, dict):
            return all(isinstance(k, str) and plain(v) for k, v in item.items())
        return isinstance(item, SAVABLE)
    return plain(batches)
