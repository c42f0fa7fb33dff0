"""Which layers of a model a function acts on: one selector, by names and patterns.

Layer replacement is driven by names, as in peft (``target_modules`` / ``exclude_modules``)
and Torch-Pruning (``ignored_layers``). Every function that selects layers takes

- ``layer_names``: the layers to act on; ``None`` means every candidate;
- ``exclude``: layers to leave out of that set; ``None`` or empty excludes nothing.

Each is a string or a list of strings, and each string is one of

- an exact qualified module name, as ``model.named_modules()`` gives it (``"features.0"``);
- a glob pattern (:func:`fnmatch.fnmatchcase`, when it holds ``*``, ``?`` or ``[``):
  ``"features.*"``, ``"*.conv1"``, ``"layer[12].*"``. ``*`` also crosses dots;
- a regular expression, written with the prefix ``"re:"`` (so it also works on the command
  line): ``r"re:features\\.\\d+"``. It must match the whole name (:func:`re.fullmatch`).

The selection is ``S = {c in C : c matches layer_names} \\ {c in C : c matches exclude}``, in
model order, where ``C`` are the candidates: the layers the function can act on (projectable
layers for projection, truncatable convolutions for kernel truncation). Every entry must
match at least one candidate; an exact name of a module that is not a candidate is refused
with the reason (:mod:`rankwise.kinds`), so a typo never silently selects nothing.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

from rankwise.forms import compressed_parts, describe_form, is_form
from rankwise.kinds import kind_of, supported_names
from rankwise.ties import shared_owners, table_first, tied_pairs, why_tie_cannot_hold

REGEX_PREFIX = "re:"
GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class SelectableLayers:
    """The layers a function can act on (its candidates), and what to say about the others.

    Attributes
    ----------
    layers : dict of str to torch.nn.Module
        The candidates, by qualified name, in model order.
    refusal : callable
        ``refusal(module) -> str or None``: why a module that is not a candidate is refused
        (a module inside a compressed form is refused for that, :func:`rankwise.forms.compressed_parts`).
    verb : str
        What the function does to a layer (``"projected"``, ``"truncated"``), for messages.
    listing : str
        How messages introduce the candidates (``"Projectable layers"``).
    none : str
        The error when there is no candidate at all and ``layer_names`` is ``None``.
    """

    layers: dict
    refusal: Callable[[nn.Module], str | None]
    verb: str
    listing: str
    none: str


def layer_kind(module: nn.Module) -> str:
    """Short name of a projectable layer type: ``"linear"``, ``"conv1d"``, ..., ``"lstm"``, ``"gru"``."""
    return kind_of(module).name


def why_not_projectable(module: nn.Module) -> str | None:
    """The reason ``module`` cannot be projected, or ``None`` when it can (see :mod:`rankwise.kinds`).

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    str or None
    """
    if is_form(module):
        return f"it is already compressed ({describe_form(module)})"
    kind = kind_of(module)
    if kind is None:
        return f"{type(module).__name__} layers are not supported (supported: {supported_names()})"
    return kind.refusal(module)


def projectable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every projectable layer of ``model``, by qualified name, in model order.

    Layers that are, or are inside, a compressed form (:func:`rankwise.forms.compressed_parts`)
    are not listed, nor layers whose parameters another module holds too (:func:`tied_layers`),
    nor layers whose parent uses their weight without calling them (:func:`functional_layers`).
    """
    left_out = set(compressed_parts(model)) | set(tied_layers(model)) | set(functional_layers(model))
    return {name: module for name, module in model.named_modules()
            if name not in left_out and why_not_projectable(module) is None}


def tied_layers(model: nn.Module) -> dict[str, str]:
    """``{layer: why}`` for the modules holding a parameter that another module holds too, but the
    table of a tie compressed as one unit (:func:`rankwise.ties.tied_pairs`), which is a candidate.

    A tied pair (a language model's output head sharing the token embedding's table) is one
    set of learnables used twice: replacing either end alone would break the tie and add the
    factored form's learnables to the shared table, making the network larger. Where the tie
    can hold, the pair is compressed under the table's name, one factored table serving both
    ends (:mod:`rankwise.layers.tied`), and its head is withheld as a layer of its own; any
    other tie is left dense, with the reason it cannot hold.
    """
    parts = compressed_parts(model)
    tied = {}
    for names in shared_owners(model):
        names = table_first(model, names)
        if any(name in parts for name in names):
            continue
        reason = why_tie_cannot_hold(model, names)
        if reason is None:
            tied[names[1]] = (f"it is the output head tied to {names[0]!r} (the same tensor): the pair is "
                              f"compressed as one unit, one factored table serving both ends; select "
                              f"{names[0]!r} to compress it")
            continue
        for name in names:
            others = ", ".join(repr(other) for other in names if other != name)
            tied[name] = (f"its weight is tied to {others} (the same tensor), and the tie cannot be kept "
                          f"compressed: {reason}; leave it out, or untie the weights first")
    return tied


def functional_layers(model: nn.Module) -> dict[str, str]:
    """``{layer: why}`` for the layers whose parent uses their weight without calling them.

    An ``nn.MultiheadAttention`` passes ``out_proj.weight`` and ``out_proj.bias`` to
    ``F.multi_head_attention_forward``, which computes ``y = W_o z + b_o`` itself: the
    ``out_proj`` Linear's own forward never runs, so a hook on it sees no observation and a
    wrapper put in its place would never be called. The attention layer itself is the
    candidate (:mod:`rankwise.layers.attention` projects its ``out_proj`` with the rest). The
    children concerned are the ``functional_children`` of the parent's family
    (:class:`rankwise.kinds.Family`).
    """
    return {_child(name, child): (
        f"it is the {child} of the {_class_name(module)} {name!r}, which uses its weight "
        "functionally without calling it, so it cannot be projected as a layer of its own; "
        + _instead(name, module))
        for name, module in model.named_modules() if kind_of(module) is not None
        for child in kind_of(module).traits.functional_children}


def _class_name(module: nn.Module) -> str:
    """``"nn.MultiheadAttention"`` for a class of ``torch.nn``, the class name otherwise."""
    cls = type(module)
    return f"nn.{cls.__name__}" if getattr(nn, cls.__name__, None) is cls else cls.__name__


def _instead(attention_name: str, attention: nn.Module) -> str:
    reason = why_not_projectable(attention)
    if reason is None:
        return f"project the attention layer {attention_name!r} itself, which projects its out_proj"
    return f"the attention layer {attention_name!r} cannot be projected either: {reason}"


def _child(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def tied_left_out(model: nn.Module, layer_names=None, exclude=None) -> dict[str, str]:
    """``{layer: why}``: the tied layers left dense that ``layer_names`` would select were they
    not tied, in model order.

    With ``layer_names=None`` every such layer; otherwise those its patterns match (an exact
    name of a tied layer is refused by :func:`select_layers` with the same reason). A head
    whose table is compressed with it is not left dense; a table whose head ``exclude`` names
    is (the tie cannot hold with one end compressed). The functions that select by
    ``layer_names`` list these as excluded.
    """
    entries = _entries(layer_names, "layer_names", allow_empty=False)
    pairs, dropped = tied_pairs(model), _heads_excluded(tied_pairs(model), exclude)
    selected = set(select_layers(model, layer_names, exclude)) if pairs else set()
    dropped |= {table: head for table, head in pairs.items()  # a table excluded itself: listed as excluded
                if any(_matches(entry, table, "exclude") for entry in _entries(exclude, "exclude", True))}
    named = lambda name: not entries or any(_matches(entry, name, "layer_names") for entry in entries)  # noqa: E731
    left = {name: why for name, why in tied_layers(model).items()
            if why_not_projectable(model.get_submodule(name)) is None and named(name)
            and not any(head == name and (table in selected or table in dropped) for table, head in pairs.items())}
    left.update({table: (f"its tied head {head!r} was excluded, and the tie cannot hold with one end "
                         "compressed; exclude neither end to compress the pair")
                 for table, head in _heads_excluded(pairs, exclude).items() if named(table)})
    return {name: left[name] for name, _ in model.named_modules() if name in left}


def tie_warnings(tied: dict) -> list[str]:
    """One warning per layer left dense because its weight is tied (``{layer: why}`` of
    :func:`tied_left_out`)."""
    return [f"layer {name!r} was left dense: {why}." for name, why in tied.items()]


def select_layers(model: nn.Module, layer_names=None, exclude=None) -> dict[str, nn.Module]:
    """The projectable layers named by ``layer_names``, less those named by ``exclude``.

    Parameters
    ----------
    model : torch.nn.Module
    layer_names : str or iterable of str, optional
        Exact names, glob patterns or ``"re:"`` regular expressions (see the module docstring);
        every projectable layer when ``None``.
    exclude : str or iterable of str, optional
        Names or patterns of layers to leave out.

    Returns
    -------
    dict of str to torch.nn.Module
        In model order.

    Raises
    ------
    ValueError
        Naming ``layer_names`` or ``exclude``, when an entry matches no projectable layer (they
        are listed), names a layer that cannot be projected (the reason is given), is not a
        valid regular expression, or when ``exclude`` leaves nothing; naming ``model`` when it
        has no projectable layer.
    """
    withheld = {id(model.get_submodule(name)): why
                for name, why in {**tied_layers(model), **functional_layers(model)}.items()}
    candidates = SelectableLayers(projectable_layers(model),
                                  lambda module: withheld.get(id(module)) or why_not_projectable(module),
                                  "projected", "Projectable layers",
                                  f"model: it has no projectable layer ({supported_names()}).")
    pairs = tied_pairs(model)
    dropped = _heads_excluded(pairs, exclude)
    exclude = [entry for entry in _entries(exclude, "exclude", allow_empty=True)
               if not any(_matches(entry, head, "exclude") for head in pairs.values())
               or any(_matches(entry, name, "exclude") for name in candidates.layers)]
    selected = select(model, candidates, layer_names, exclude)
    for table, head in dropped.items():
        if table in selected and table in _entries(layer_names, "layer_names", allow_empty=False):
            raise ValueError(f"exclude: {head!r} is the output head tied to {table!r}, which layer_names "
                             "names: the tie cannot hold with one end compressed. Exclude neither end to "
                             "compress the pair, or both to leave it dense.")
    selected = {name: module for name, module in selected.items() if name not in dropped}
    if not selected:
        raise ValueError(f"exclude: it leaves no layer to be projected (the tied table(s) "
                         f"{', '.join(dropped)} go with their excluded head); exclude fewer layers.")
    return selected


def _heads_excluded(pairs: dict, exclude) -> dict[str, str]:
    """``{table: head}`` of the tied pairs whose head an entry of ``exclude`` matches."""
    entries = _entries(exclude, "exclude", allow_empty=True)
    return {table: head for table, head in pairs.items() if any(_matches(entry, head, "exclude") for entry in entries)}


def select(model: nn.Module, candidates: SelectableLayers, layer_names=None, exclude=None,
           argument: str = "layer_names") -> dict[str, nn.Module]:
    """``{c : c matches layer_names} \\ {c : c matches exclude}`` over ``candidates``, in model order.

    ``argument`` is how the error messages call ``layer_names`` (``"ranks"`` when the names
    are the keys of a rank dict). See the module docstring for the entries; the errors are
    those of :func:`select_layers`.
    """
    if layer_names is None:
        if not candidates.layers:
            raise ValueError(candidates.none)
        chosen = set(candidates.layers)
    else:
        chosen = _matching(model, candidates, _entries(layer_names, argument, allow_empty=False), argument)
    removed = _matching(model, candidates, _entries(exclude, "exclude", allow_empty=True), "exclude")
    selected = {name: module for name, module in candidates.layers.items()
                if name in chosen and name not in removed}
    if not selected:
        raise ValueError(f"exclude: it leaves no layer to be {candidates.verb} (it removes "
                         f"{', '.join(name for name in candidates.layers if name in removed)}); "
                         "exclude fewer layers.")
    return selected


def _entries(value, argument: str, allow_empty: bool) -> list[str]:
    if value is None:
        return []
    entries = [value] if isinstance(value, str) else list(value)
    if not entries and not allow_empty:
        raise ValueError(f"{argument}: the list is empty; pass None to select every layer.")
    bad = [entry for entry in entries if not isinstance(entry, str)]
    if bad:
        raise ValueError(f"{argument}: expected layer names or patterns (strings), got {bad[0]!r}.")
    return entries


def _matching(model: nn.Module, candidates: SelectableLayers, entries: list[str], argument: str) -> set[str]:
    """The candidates matched by any of ``entries``; a ValueError for an entry matching none."""
    matched = set()
    for entry in entries:
        found = [name for name in candidates.layers if _matches(entry, name, argument)]
        if not found:
            raise ValueError(_no_match(model, candidates, entry, argument))
        matched.update(found)
    return matched


def _matches(entry: str, name: str, argument: str) -> bool:
    if entry.startswith(REGEX_PREFIX):
        try:
            return re.fullmatch(entry[len(REGEX_PREFIX):], name) is not None
        except re.error as error:
            raise ValueError(f"{argument}: {entry!r} is not a valid regular expression ({error}).") from None
    return fnmatch.fnmatchcase(name, entry) if _is_glob(entry) else entry == name


def _no_match(model: nn.Module, candidates: SelectableLayers, entry: str, argument: str) -> str:
    """Why ``entry`` matched no candidate: the refusal of the module it names, or the candidates."""
    modules, parts = dict(model.named_modules()), compressed_parts(model)
    if entry in modules:
        form = parts.get(entry, entry)
        reason = (f"it lies inside the compressed form {form!r} ({describe_form(modules[form])})" if form != entry
                  else candidates.refusal(modules[entry]))
        return f"{argument}: {entry!r} cannot be {candidates.verb}: {reason}."
    pattern = entry.startswith(REGEX_PREFIX) or _is_glob(entry)
    problem = f"matches no layer that can be {candidates.verb}" if pattern else "is not a layer of the model"
    return f"{argument}: {entry!r} {problem}. {candidates.listing}: {', '.join(candidates.layers) or 'none'}."


def _is_glob(entry: str) -> bool:
    return any(character in entry for character in GLOB_CHARACTERS)


def excluded_layers(model: nn.Module, layer_names, layers: dict, tied=()) -> list[str]:
    """The layers that ``layer_names`` selects and that are not in ``layers`` (left out by
    ``exclude``), the ``tied`` layers left out (:func:`~rankwise.targets.tied_left_out`), and
    by default (``layer_names`` is ``None``) the Linear layers left out because their parent
    uses their weight functionally (:func:`rankwise.targets.functional_layers`: the
    ``out_proj`` of an ``nn.MultiheadAttention``) where that parent is not in ``layers``, in
    model order."""
    left_out = {name for name in select_layers(model, layer_names) if name not in layers} | set(tied)
    if layer_names is None:
        left_out |= {name for name in functional_layers(model) if name.rpartition(".")[0] not in layers}
    return [name for name, _ in model.named_modules() if name in left_out]
