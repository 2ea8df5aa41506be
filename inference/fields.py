"""Typed dataclasses as configuration: a table's values checked against the fields' annotations.

One way to validate a settings table (a TOML ``[[models]]`` entry, a sidecar JSON): declare it as a
frozen dataclass, build it with ``from_table`` (unknown keys, required keys, TOML lists to tuples),
and let its ``__post_init__`` call ``check_types`` and then check what types cannot say (ranges,
choices). Every problem is a ``FieldError`` naming the key, so the caller can prefix where the
table came from (``models[2].overlap: ...``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", Path: "a path"}


class FieldError(ValueError):
    """A value does not fit its field; the message starts with the key (``roi_size: ...``)."""


def from_table(cls: type[T], table: Any, where: str = "") -> T:
    """``cls(**table)`` after refusing unknown and missing keys and turning TOML values into the
    fields' types: lists into tuples, a lone string into a one-string tuple, strings into paths,
    integers into floats. ``where`` (``rules[0]``) prefixes every error's key."""
    try:
        if not isinstance(table, Mapping):
            raise FieldError(f": expected a table, got {type(table).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        for key in table:
            if key not in fields:
                raise FieldError(f"{key}: unknown key (allowed: {', '.join(sorted(fields))})")
        for name in required_keys(cls):
            if name not in table:
                raise FieldError(f"{name}: required")
        hints = typing.get_type_hints(cls)
        return cls(**{key: _convert(v, hints[key]) for key, v in table.items()})
    except FieldError as err:
        if not where:
            raise
        text = str(err)
        raise type(err)(f"{where}{text}" if text.startswith(":") else f"{where}.{text}") from None


def required_keys(cls: type) -> list[str]:
    """The fields a table must give (those without a default)."""
    return [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING]


def _convert(value: Any, kind: Any) -> Any:
    """A TOML value in the form its annotation wants, where the conversion cannot lose anything."""
    kinds = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, str):
        if Path in kinds:
            return Path(value)
        if tuple[str, ...] in kinds and str not in kinds and len(kinds) == 1:
            return (value,)
    if type(value) is int and float in kinds and int not in kinds:
        return float(value)
    return value


def check_types(instance: Any) -> None:
    """FieldError for the first field whose value does not match its annotation."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if not _fits(value, hints[f.name]):
            raise FieldError(f"{f.name}: expected {describe(hints[f.name])}, got {value!r}")


def _fits(value: Any, kind: Any) -> bool:
    origin = typing.get_origin(kind)
    if kind is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, k) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if origin is tuple:
        item = typing.get_args(kind)[0]
        return isinstance(value, tuple) and all(_fits(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(kind)
        return isinstance(value, dict) and all(_fits(k, key) and _fits(v, item) for k, v in value.items())
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # TOML true is not a number
        return False
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def describe(kind: Any) -> str:
    """An annotation in words, for error messages."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(k) for k in typing.get_args(kind) if k is not type(None))
    if origin is tuple:
        return f"a list of {describe(typing.get_args(kind)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a table"
    return _NAMES.get(kind, getattr(kind, "__name__", str(kind)))
