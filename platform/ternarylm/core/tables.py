"""Markdown tables, as results, frontiers and reports print and log them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def cell(value: Any) -> str:
    """A value as a table cell: floats to 4 significant digits, None empty, and text kept on
    one line without the column separator."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "/").replace("\n", " ")


def markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A header, a rule and one line per row (a missing column is an empty cell)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
