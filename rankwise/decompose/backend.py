"""tensorly, imported only where Tucker and CP decompositions run.

tensorly (and the scipy it pulls in) is an optional dependency: ``import rankwise`` and every
other method work without it, and it costs nothing until ``method="tucker"`` or ``"cp"`` runs.
"""

from __future__ import annotations

import importlib


def tensorly():
    """The ``tensorly`` module with its ``decomposition`` submodule loaded.

    Raises
    ------
    ImportError
        Saying how to install it, when tensorly is absent.
    """
    try:
        module = importlib.import_module("tensorly")
        importlib.import_module("tensorly.decomposition")
    except ImportError:
        raise ImportError("method='tucker' and method='cp' need tensorly: pip install tensorly "
                          "(or pip install 'rankwise[decompose]').") from None
    return module
