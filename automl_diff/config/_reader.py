"""Reading YAML mappings into typed values, with errors that name the file and the dotted key."""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from automl_diff.errors import UserError

_REQUIRED = object()


def load_yaml(path: str | Path, *, what: str) -> dict[str, Any]:
    """Parse a YAML file with the safe loader; the top level must be a mapping.

    Raises:
        UserError: the file is missing, not YAML, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


class Section:
    """One mapping of a YAML file; ``take`` reads keys, ``done`` rejects the keys nobody read.

    Args:
        data: the mapping.
        file: the file it came from (named in every error).
        prefix: the dotted key of this mapping inside the file (``""`` at the top level).
    """

    def __init__(self, data: Any, *, file: str | Path, prefix: str = "") -> None:
        self.file = str(file)
        self.prefix = prefix
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise self.error(prefix or "(top level)", data, "expected a mapping")
        self.data = dict(data)
        self._read: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else str(name)

    def error(self, key: str, value: Any, message: str) -> UserError:
        return UserError(f"{self.file}: {key}: {message} (got {value!r})")

    def has(self, name: str) -> bool:
        return name in self.data

    def take(
        self,
        name: str,
        kind: type | tuple[type, ...],
        default: Any = _REQUIRED,
        *,
        choices: Iterable[Any] | None = None,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        """Read ``name``; check its type, its allowed values and a custom rule.

        ``check`` returns an error message, or None when the value is fine.
        """
        self._read.add(name)
        if name not in self.data:
            if default is _REQUIRED:
                raise UserError(f"{self.file}: {self.key(name)}: required key is missing")
            return default
        value = self.data[name]
        value = _coerce(value, kind)
        if value is None or not _is_instance(value, kind):
            raise self.error(self.key(name), self.data[name], f"expected {_type_name(kind)}")
        if choices is not None:
            allowed = list(choices)
            if value not in allowed:
                raise self.error(self.key(name), value, f"must be one of {', '.join(map(str, allowed))}")
        if check is not None:
            message = check(value)
            if message:
                raise self.error(self.key(name), value, message)
        return value

    def section(self, name: str, *, required: bool = False) -> Section:
        """A nested mapping as its own :class:`Section` (empty when absent and not required)."""
        self._read.add(name)
        if name not in self.data and required:
            raise UserError(f"{self.file}: {self.key(name)}: required key is missing")
        return Section(self.data.get(name), file=self.file, prefix=self.key(name))

    def take_list(
        self,
        name: str,
        kind: type | tuple[type, ...],
        default: Any = _REQUIRED,
        *,
        check: Callable[[Any], str | None] | None = None,
    ) -> tuple[Any, ...] | Any:
        """Read a non-empty list whose items all have type ``kind`` (a scalar counts as one item)."""
        self._read.add(name)
        if name not in self.data:
            if default is _REQUIRED:
                raise UserError(f"{self.file}: {self.key(name)}: required key is missing")
            return default
        raw = self.data[name]
        items = raw if isinstance(raw, list) else [raw]
        if not items:
            raise self.error(self.key(name), raw, "expected a non-empty list")
        out = []
        for i, item in enumerate(items):
            value = _coerce(item, kind)
            if value is None or not _is_instance(value, kind):
                raise self.error(f"{self.key(name)}[{i}]", item, f"expected {_type_name(kind)}")
            if check is not None:
                message = check(value)
                if message:
                    raise self.error(f"{self.key(name)}[{i}]", item, message)
            out.append(value)
        if len(set(map(repr, out))) != len(out):
            raise self.error(self.key(name), raw, "repeats a value")
        return tuple(out)

    def rest(self) -> dict[str, Any]:
        """The keys not read yet (for free-form option mappings); marks them read."""
        rest = {k: v for k, v in self.data.items() if k not in self._read}
        self._read.update(rest)
        return rest

    def done(self) -> None:
        """Raise for the first key that was never read (a typo, or an option that does not exist)."""
        unknown = [k for k in self.data if k not in self._read]
        if unknown:
            known = sorted(self._read)
            raise self.error(self.key(str(unknown[0])), self.data[unknown[0]], f"unknown key; known keys here: {', '.join(known)}")


def positive(value: float) -> str | None:
    """A ``check`` for :meth:`Section.take`: the value must be greater than zero."""
    return None if value > 0 else "must be positive"


def _is_instance(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False
    return isinstance(value, kinds)


def _coerce(value: Any, kind: type | tuple[type, ...]) -> Any:
    """YAML reads ``1e-3`` as a string and ``2`` as an int where a float is wanted: fix those two."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
    return value


# --- declarative dataclass fields -----------------------------------------------------------------

#: The metadata key of a config field (:func:`setting`).
_SETTING = "automl_diff.setting"


@dataclasses.dataclass(frozen=True)
class Setting:
    """Where a config field is read from and what it means (:func:`setting`'s metadata).

    Attributes:
        section: the YAML section (None: the top level).
        key: the key in that section (None: the field's name).
        doc: one line for the configuration reference.
        choices: the values allowed.
        check: returns a message for a bad value, None for a good one.
        path: the value is a path relative to the config file (resolved when read).
        kind: what the reference calls the value's type, where its annotation does not say.
        required: the file must set it (the default is a placeholder).
    """

    section: str | None
    key: str | None = None
    doc: str = ""
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    path: bool = False
    kind: str | None = None
    required: bool = False


def setting(
    default: Any,
    *,
    section: str | None,
    doc: str,
    key: str | None = None,
    choices: Iterable[Any] | None = None,
    check: Callable[[Any], str | None] | None = None,
    path: bool = False,
    kind: str | None = None,
    required: bool = False,
) -> Any:
    """A dataclass field that a config file sets: its default, its place in the YAML file and its
    documentation, in one place (:func:`read_settings` reads it; the reference is generated from it)."""
    meta = {_SETTING: Setting(section, key, doc, tuple(choices) if choices is not None else None, check, path, kind, required)}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def setting_of(f: dataclasses.Field) -> Setting | None:
    """The :class:`Setting` of a dataclass field (None: not read from the file)."""
    return f.metadata.get(_SETTING)


def _plain_kind(kind: Any) -> tuple[type | tuple[type, ...], bool]:
    """``(the value's type(s), whether it is a tuple of them)`` of a field's annotation."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    origin = typing.get_origin(kind)
    if origin is tuple:
        return args[0], True
    if origin in (typing.Union, types.UnionType) and args:
        return (tuple(args) if len(args) > 1 else args[0]), False
    return (origin if origin is not None else kind), False


def read_settings(cls: type, sections: Mapping[str | None, Section], *, base: Path | None = None, **given: Any) -> Any:
    """An instance of the dataclass ``cls``, each field read from its YAML place (:func:`setting`),
    nested dataclasses read the same way; fields in ``given`` are taken as they are.

    Args:
        sections: the file's sections by name (None: the top level).
        base: the folder relative paths are resolved against.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            values[f.name] = given[f.name]
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            values[f.name] = read_settings(kind, sections, base=base)
            continue
        where = setting_of(f)
        if where is None:
            continue
        section = sections[where.section]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        plain, many = _plain_kind(kind)
        key = where.key or f.name
        if many:
            value = section.take_list(key, plain, default, check=where.check)
        else:
            value = section.take(key, plain, default, choices=where.choices, check=where.check)
        if where.path and isinstance(value, str) and base is not None:
            value = resolve_path(base, value)
        values[f.name] = value
    return cls(**values)


def resolve_path(base: Path, value: str) -> str:
    """A path in a config is relative to the config file; hub ids and names stay as they are."""
    candidate = (base / value).resolve()
    if candidate.exists() or value.startswith((".", "/", "~")) or value.endswith((".yaml", ".yml", ".json")):
        return str(candidate) if not value.startswith("~") else str(Path(value).expanduser())
    return value
