"""Typed reads of configuration values, each failure a ConfigError naming the key: shared by the
node's configuration and the destination kinds, which parse their own tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what is wrong."""


def check_type(key: str, value: Any, expected: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) and expected in (int, float, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise ConfigError(f"{key}: expected {names}, got {type(value).__name__} {value!r}")
    return value


def strings(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    check_type(key, value, list)
    return tuple(check_type(f"{key}[{i}]", v, str) for i, v in enumerate(value))


def known(section: str, table: dict[str, Any], allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            where = f"{section}.{key}" if section else key
            raise ConfigError(f"{where}: unknown key (allowed: {', '.join(sorted(allowed))})")


def ae_title(key: str, value: Any) -> str:
    check_type(key, value, str)
    if not 0 < len(value) <= 16 or "\\" in value or not value.isprintable():
        raise ConfigError(f"{key}: an AE title is 1-16 printable characters, got {value!r}")
    return str(value)


def port(key: str, value: Any) -> int:
    check_type(key, value, int)
    if not 0 <= value <= 65535:
        raise ConfigError(f"{key}: port must be 0-65535, got {value}")
    return int(value)


def positive(key: str, value: Any) -> float:
    check_type(key, value, (int, float))
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")
    return float(value)


def existing_file(key: str, value: Any, base: Path | None = None) -> Path:
    """A file that must exist (certificates, keys); relative paths start at ``base``."""
    path = Path(check_type(key, value, str))
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise ConfigError(f"{key}: no such file {str(path)!r}")
    return path
