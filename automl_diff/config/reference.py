"""The configuration reference (``docs/configuration.md``), generated from the config dataclasses.

Every key a study file may set is declared once, with its default, check and meaning, on a field
of :mod:`automl_diff.config` (:func:`~automl_diff.config._reader.setting`); this module writes the
reference from those fields, so the documentation cannot drift from the loader. A test fails
when the file in ``docs/`` is not what :func:`reference` writes::

    python -m automl_diff.config.reference > docs/configuration.md
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any

from automl_diff.config._reader import Setting, setting_of
from automl_diff.config.evaluation import Evaluation
from automl_diff.config.options import METHOD_OPTIONS
from automl_diff.config.settings import Budgets
from automl_diff.config.study import PROMPT_FILES, StudyConfig

__all__ = ["reference"]

#: The sections of a study file, in the order the reference shows them, with what each is for.
SECTIONS: tuple[tuple[str | None, str], ...] = (
    (None, "What the study is: its method, the model it compresses, its objectives and where results go."),
    ("sampler", "The Optuna sampler that proposes each trial's parameters."),
    ("budgets", "Training budgets of a trial, and the budgets of its evaluation."),
    ("sampling", "The sampler every model of the study runs: its FID, latency, and the trajectories DiP-GO prunes."),
    ("prompts", "Text-to-image teachers: the prompt files (relative to the config) and how text alignment is measured."),
    ("fid", "FID's reference and feature space."),
    ("pruner", "Early stopping of hopeless trials at rungs (MO-ASHA, on both backends)."),
    ("execution", "How trials run: heartbeats and retries, Ray resources, data-parallel processes."),
)


def _type_name(kind: Any) -> str:
    names = {int: "integer", float: "number", str: "string", bool: "true/false", dict: "mapping"}
    origin = typing.get_origin(kind)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args) + (" or null" if type(None) in typing.get_args(kind) else "")
    if origin is dict:
        return "mapping"
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def _default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_default(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fields(cls: type) -> Iterator[tuple[Setting, str, dataclasses.Field]]:
    """Every field of ``cls`` a file sets, nested dataclasses included: (setting, type name, field)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _fields(kind)
            continue
        where = setting_of(f)
        if where is not None:
            yield where, where.kind or _type_name(kind), f


def _row(where: Setting, kind: str, f: dataclasses.Field) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    choices = f" One of: {', '.join(map(str, where.choices))}." if where.choices else ""
    shown = "required" if where.required else f"`{_default(default)}`"
    return f"| `{where.key or f.name}` | {kind} | {shown} | {where.doc}.{choices} |"


def _table(rows: list[str]) -> list[str]:
    return ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]


def reference() -> str:
    """The configuration reference, Markdown."""
    rows: dict[str | None, list[str]] = {section: [] for section, _ in SECTIONS}
    seen: set[tuple[str | None, str]] = set()
    for cls in (StudyConfig, Budgets, Evaluation):
        for where, kind, f in _fields(cls):
            key = (where.section, where.key or f.name)
            if key not in seen:
                seen.add(key)
                rows[where.section].append(_row(where, kind, f))
    rows["prompts"] = [f"| `{key}` | string | `null` | {doc}. |" for key, doc in PROMPT_FILES.items()] + rows["prompts"]
    lines = [
        "# Configuration reference",
        "",
        "Every key of a study config (`studies/*.yaml`), generated from the dataclasses in `automl_diff/config/`",
        "by `python -m automl_diff.config.reference > docs/configuration.md` (a test fails when this file is stale).",
        "Paths are relative to the config file; every error names the file and the dotted key.",
        "",
    ]
    for section, what in SECTIONS:
        lines += [f"## {'Top level' if section is None else f'`{section}:`'}", "", what, "", *_table(rows[section])]
    for name, options in METHOD_OPTIONS.items():
        doc = " ".join((options.__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "`")
        lines += [f"## `method_options:` of `method: {name}`", "", doc, ""]
        lines += _table([_row(where, kind, f) for where, kind, f in _fields(options)])
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
