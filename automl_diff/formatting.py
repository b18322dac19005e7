"""How numbers are written in tables, notes, reports and model cards."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["fmt_number", "fmt_si", "text_table"]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_number(value: Any, unit: str = "") -> str:
    """``1,234,567`` for an integer, four significant digits for a float, ``-`` where missing."""
    if _missing(value):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def fmt_si(value: Any, unit: str = "") -> str:
    """``62.5M``, ``1.25G``: three significant digits with an SI suffix from a thousand up; below,
    four significant digits for a float and the integer as it is; ``-`` where missing."""
    if _missing(value):
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}{unit}"
    return f"{value:.4g}{unit}" if isinstance(value, float) else f"{value}{unit}"


def text_table(header: list[str], rows: list[list[str]], *, left: int = 0) -> str:
    """A plain-text table: a header, a rule, the rows; the first ``left`` columns left-aligned,
    the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])
