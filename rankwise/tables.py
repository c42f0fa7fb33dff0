"""Plain-text tables for the terminal (summaries of projection, steps, probes)."""

from __future__ import annotations


def format_table(header, rows, footer: str | None = None) -> str:
    """Left-aligned columns separated by two spaces, a rule under the header.

    Parameters
    ----------
    header : sequence of str
    rows : sequence of sequences of str
    footer : str, optional
        A last line under the table.
    """
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + ([footer] if footer else []))


def format_ranks(ranks) -> str:
    """``"-"`` for a side not projected, ``"12"``, or a rank per cell such as ``"-/-/3/3"``."""
    if isinstance(ranks, tuple | list):
        return "/".join(map(format_ranks, ranks))
    return "-" if ranks is None else str(ranks)
