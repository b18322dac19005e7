"""Prompt sets: what a text-to-image study trains on and what it is measured on.

A prompt file is plain text with one prompt per line (blank lines and lines starting with ``#``
are skipped), or a CSV/TSV file (``.csv``, ``.tsv``) whose prompts are one named column.
"""

from __future__ import annotations

import csv
from pathlib import Path

from automl_diff.errors import UserError

__all__ = ["read_prompts"]


def read_prompts(path: str | Path, *, column: str | None = None, where: str = "prompts") -> tuple[str, ...]:
    """The prompts of ``path``, in file order.

    Args:
        path: a ``.txt`` file (one per line) or a ``.csv``/``.tsv`` file.
        column: the CSV/TSV column holding the prompts (required for those files).
        where: what named the file (the config key), for errors.

    Raises:
        UserError: the file is missing or unreadable, the column is missing, or the set is empty.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{where}: the prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: cannot read {path}: {exc}") from None
    if path.suffix.lower() in (".csv", ".tsv"):
        if column is None:
            raise UserError(f"{where}: {path} is a {path.suffix[1:].upper()} file; name its prompt column (column: ...)")
        rows = csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        if column not in (rows.fieldnames or []):
            raise UserError(f"{where}: {path} has no column '{column}' (columns: {', '.join(rows.fieldnames or []) or 'none'})")
        prompts = tuple((row.get(column) or "").strip() for row in rows)
        prompts = tuple(p for p in prompts if p)
    else:
        prompts = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise UserError(f"{where}: {path} holds no prompts")
    return prompts
