"""Typed, closed configuration files: a TOML file -> frozen dataclasses.

The dataclass is the schema: its fields are the keys, their annotations the types, their
defaults the defaults. Unknown keys are errors (with a suggestion, also for a key put in the
wrong table), wrong types are errors, missing required keys are errors — every problem is
collected and reported at once in one ``ConfigError``. Relative paths are resolved against the
config file's folder, never the current directory.

Supported annotations: ``str``, ``int``, ``float`` (an integer is accepted), ``bool``,
``Path``, ``Literal[...]``, ``list[T]`` (a single value is accepted as a one-item list),
``dict[str, T]``, unions (``X | None`` means optional: TOML has no null), nested dataclasses.

A field whose value is wrong (or a required one that is missing) is set to ``INVALID`` and the
build goes on, so the caller's own checks (ranges, names, files) run on everything else and all
problems come out in one report; those checks skip ``INVALID`` values.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from mfprune.errors import ConfigError

T = TypeVar("T")


class _Invalid:
    """The value of a field that failed its type check (already reported)."""

    def __repr__(self) -> str:
        return "INVALID"

    def __bool__(self) -> bool:
        return False


INVALID: Any = _Invalid()


def valid(value: Any) -> bool:
    return value is not INVALID


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; ConfigError (with the line) when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}", hint="pass --config FILE.toml")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def build(
    cls: type[T],
    raw: dict[str, Any],
    *,
    base_dir: Path,
    source: str = "",
    check: Callable[[T], list[str]] | None = None,
) -> T:
    """Build ``cls`` from ``raw``; run ``check`` (the caller's own rules: it returns
    problems, and must skip ``INVALID`` values) on the result; raise ConfigError listing every
    problem at once."""
    problems: list[str] = []
    value = _build(cls, raw, "", base_dir, problems)
    if check is not None and valid(value):
        problems += check(value)
    if problems:
        raise ConfigError(problems, source=source)
    return value


def _build(cls: type, raw: Any, prefix: str, base_dir: Path, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"'{prefix}' must be a table ([{prefix}]), got {_kind(raw)}")
        return INVALID
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    nested = {  # keys of sub-tables, to suggest 'prune.keep_ratio' for a misplaced 'keep_ratio'
        sub: _dotted(name, sub)
        for name in fields
        if (sub_cls := _dataclass_of(hints[name])) is not None
        for sub in (f.name for f in dataclasses.fields(sub_cls))
    }
    for key in raw:
        if key in fields:
            continue
        where = _dotted(prefix, key)
        close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
        suggestion = nested.get(key) or (close[0] if close else None)
        hint = f" — did you mean '{_dotted(prefix, suggestion)}'?" if suggestion else ""
        problems.append(f"unknown key '{where}'{hint}")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        where = _dotted(prefix, name)
        if name not in raw:
            required = (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            )
            if required:
                problems.append(f"missing key '{where}'")
                kwargs[name] = INVALID
            continue
        good, value = _convert(raw[name], hints[name], where, base_dir, problems)
        kwargs[name] = value if good else INVALID
    return cls(**kwargs)


def _convert(
    value: Any, tp: Any, where: str, base_dir: Path, problems: list[str]
) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        built = _build(tp, value, where, base_dir, problems)
        return valid(built), built
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # X | None: X's own message (with its suggestion)
            return _convert(value, members[0], where, base_dir, problems)
        for member in members:
            scratch: list[str] = []
            good, converted = _convert(value, member, where, base_dir, scratch)
            if good:
                return True, converted
        problems.append(f"'{where}' must be {_describe(tp)}, got {_kind(value)}")
        return False, None
    if origin is Literal:
        if value in args:
            return True, value
        choices = [str(a) for a in args]
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        problems.append(f"'{where}' must be one of {', '.join(choices)}, got {value!r}{hint}")
        return False, None
    if origin is list:
        items = value if isinstance(value, list) else [value]
        out = []
        good = True
        for i, item in enumerate(items):
            ok, converted = _convert(item, args[0], f"{where}[{i}]", base_dir, problems)
            good &= ok
            out.append(converted)
        return good, out
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"'{where}' must be {_describe(tp)}, got {_kind(value)}")
            return False, None
        out_d = {}
        good = True
        for key, item in value.items():
            ok, converted = _convert(item, args[1], _dotted(where, key), base_dir, problems)
            good &= ok
            out_d[key] = converted
        return good, out_d
    if _accepts(tp, value):
        if tp is Path:
            if not value.strip():  # Path("") is "." : an unset variable must not mean a folder
                problems.append(f"'{where}' is an empty path")
                return False, None
            path = Path(value).expanduser()
            return True, path if path.is_absolute() else base_dir / path
        return True, float(value) if tp is float else value
    problems.append(f"'{where}' must be {_describe(tp)}, got {_kind(value)}")
    return False, None


def _accepts(tp: Any, value: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp in (str, Path):
        return isinstance(value, str)
    return False


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return f"a table of {_plural(args[1])}"
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        Path: "a path (string)",
    }
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    text = _describe(tp)
    for article in ("a ", "an "):
        if text.startswith(article):
            text = text[len(article) :]
    return {"path (string)": "paths", "true or false": "booleans"}.get(text, text + "s")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    names = {str: "a string", int: "an integer", float: "a number"}
    return f"{value!r} ({names.get(type(value), type(value).__name__)})"


def _dotted(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _dataclass_of(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None
