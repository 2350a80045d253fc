"""Markdown tables of metrics, as the evaluate stage and the sweep report write them."""

from __future__ import annotations

import math
from collections.abc import Sequence


def fmt(value) -> str:
    """Four significant digits; large counts (bytes, FLOPs) in full with separators; NaN blank."""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub table from a header and rows of already formatted cells."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
