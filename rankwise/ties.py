"""Tied weights: which ties of a model can be compressed as one unit, and why the others cannot.

A language model often ties its output head to its token table: the ``nn.Linear`` head
``z = E x + b`` holds the very ``nn.Embedding`` table ``E`` (``V x d``) that looks tokens up,
``e_t = E[t]``. Compressing either end alone would break the tie and add the factored form's
learnables to the shared table. The pair is compressed as **one unit**, named by the table,
with one factored table ``E ~ A B`` (``A``: ``V x r``, ``B``: ``r x d``) that serves both ends
(:mod:`rankwise.layers.tied`); its rank is chosen like every other layer's
(:mod:`rankwise.ranks.tied`).

A tie can hold when exactly two modules hold the shared tensor, one an ``nn.Embedding`` the
library can project (:mod:`rankwise.kinds`) and the other an ``nn.Linear`` reading the hidden
width ``d`` and writing the vocabulary ``V``. Any other tie (three modules on one tensor, two
``Linear`` layers, a renormalising table) stays dense, with the reason.
"""

from __future__ import annotations

from torch import nn

from rankwise.kinds import kind_of


def shared_owners(model: nn.Module) -> list[list[str]]:
    """The names of the modules holding each parameter that more than one module holds, in model order."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(name)
    return [names for names in owners.values() if len(names) > 1]


def tied_pairs(model: nn.Module) -> dict[str, str]:
    """``{table: head}``: the ties of ``model`` that can be compressed as one unit (module docstring)."""
    pairs = (table_first(model, names) for names in shared_owners(model))
    return {names[0]: names[1] for names in pairs if why_tie_cannot_hold(model, names) is None}


def table_first(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` with the ``nn.Embedding`` ones first (the table of a tie, then its head)."""
    return sorted(names, key=lambda name: not isinstance(model.get_submodule(name), nn.Embedding))


def why_tie_cannot_hold(model: nn.Module, names: list[str]) -> str | None:
    """Why the modules ``names``, which share a parameter, cannot be compressed as one tied unit,
    or ``None`` when they can (``names`` ordered by :func:`table_first`: the table, then the head)."""
    modules = [model.get_submodule(name) for name in names]
    if len(modules) != 2:
        return (f"{len(modules)} modules share the tensor; a factored table serves exactly two ends "
                "(a token table and its output head)")
    table, head = modules
    if not isinstance(table, nn.Embedding) or type(head) is not nn.Linear:
        return (f"the tie joins a {type(table).__name__} and a {type(head).__name__}; only an nn.Embedding "
                "tied to the nn.Linear output head reading it back can share one factored table")
    if head.weight is not table.weight:
        return "the head shares a tensor with the table other than its weight"
    if tuple(head.weight.shape) != (table.num_embeddings, table.embedding_dim):
        return (f"the head's weight {tuple(head.weight.shape)} and the table "
                f"({table.num_embeddings}, {table.embedding_dim}) differ in shape")
    refusal = kind_of(table).refusal(table)
    if refusal is not None:
        return f"the table cannot be projected: {refusal}"
    return None


def check_tie_correction(correction, layers: dict, model: nn.Module) -> None:
    """Refuse the sequential correction of a tied pair (it refits one layer at a time; the pair
    is two layers sharing one table), naming the table to exclude."""
    tables = [name for name in tied_pairs(model) if name in layers]
    if correction is not None and tables:
        raise ValueError(f"correction: the sequential correction refits one layer at a time, and "
                         f"{', '.join(map(repr, tables))} is a token table tied to its output head (one "
                         "factored table serving both ends); exclude it, or use correction=None.")
