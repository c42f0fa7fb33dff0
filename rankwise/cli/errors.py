"""The command line's errors: mistakes the user can fix, each told in one line.

A :class:`UsageError` names the command line's argument at fault (``--data: ...``,
``MODEL: ...``) and ends the command with exit status 2. The library's own ``ValueError``
messages name the Python argument at fault instead (``layer_names: ...``); :func:`library`
calls a library function and translates its errors into usage errors.
"""

from __future__ import annotations

LIBRARY_ONLY_HINT = ", or pass forward_fn."  # the command line has no forward_fn
CLI_DATA_HINT = " as model(batch), stacked along the first dimension."


class UsageError(ValueError):
    """A mistake the user can fix: reported in one line, exit status 2."""


def library(function, *args, argument: str | None = None, names: dict[str, str] | None = None, **kwargs):
    """Call a rankwise function; its ValueError, OSError or ImportError becomes a UsageError.

    Parameters
    ----------
    function : callable
        Called as ``function(*args, **kwargs)``.
    argument : str, optional
        The command line's argument every error of the call is about (``"MODEL"``).
    names : dict of str to str, optional
        Without ``argument``: the command line's name of each library argument
        (``{"layer_names": "--layers"}``); the argument the library's message names is
        renamed so.

    Raises
    ------
    UsageError
        For a ValueError, an OSError or an ImportError (a missing optional dependency) of the call.
    """
    try:
        return function(*args, **kwargs)
    except (ValueError, OSError, ImportError) as error:
        raise UsageError(_cli_message(str(error), argument, names or {})) from None


def _cli_message(message: str, argument: str | None, names: dict[str, str]) -> str:
    """The library's ``"name: ..."`` message with ``name`` spelled as on the command line, and
    its hint to pass ``forward_fn`` (which the command line lacks) replaced."""
    message = message.replace(LIBRARY_ONLY_HINT, CLI_DATA_HINT)
    name, separator, rest = message.partition(": ")
    named = bool(separator) and name.isidentifier()
    if argument is not None:
        return f"{argument}: {rest if named else message}"
    if named and name in names:
        return f"{names[name]}: {rest}"
    return message
