"""Argument checks shared by every entry point.

Each check raises a ``ValueError`` that names the argument and says what was expected, so a
user's mistake never surfaces as a traceback from deep inside the library; :func:`first_line`
quotes another library's error inside such a message.
"""

from __future__ import annotations

import numbers

VERBOSITY_LEVELS = ("off", "summary", "steps", "iterations")
DEFAULT_EXPLAINED_VARIANCE = 0.95


def check_verbosity(verbosity: str) -> None:
    """Raise a clear error for a verbosity level that does not exist."""
    if verbosity not in VERBOSITY_LEVELS:
        raise ValueError(f"verbosity: expected one of {', '.join(map(repr, VERBOSITY_LEVELS))}, "
                         f"got {verbosity!r}.")


def check_fraction(value, argument: str) -> float:
    """``value`` as a float, or a ValueError naming ``argument`` unless it is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{argument}: expected a number in [0, 1], got {value!r}.")
    return float(value)


def check_regularization(regularization) -> None:
    """``regularization`` must be ``"auto"`` or a float in [0, 1]."""
    if regularization == "auto":
        return
    if isinstance(regularization, bool) or not isinstance(regularization, int | float) \
            or not 0.0 <= regularization <= 1.0:
        raise ValueError(f"regularization: expected 'auto' or a float in [0, 1], got {regularization!r}.")


def check_max_batches(max_batches) -> None:
    """``max_batches`` must be a positive integer or ``None``."""
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches: expected a positive integer or None, got {max_batches!r}.")


def first_line(error: Exception) -> str:
    """The first non-empty line of an error's message, at most 200 characters (its type's name
    when it has none): another library's error, quoted inside one of ours."""
    line = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return line[:200]
