"""What the node's configuration sections share: ConfigError, and the checks that types cannot say.

Every section is a frozen dataclass whose ``__post_init__`` calls ``inference.fields.check_types``
(each value against its annotation) and then these checks on the already-typed values; each raises
a FieldError naming the field, which ``fields.from_table`` prefixes with where the table was
(``destinations[1].port: ...``).
"""

from __future__ import annotations

import re
from pathlib import Path

from vesalius.inference.fields import FieldError


class ConfigError(FieldError):
    """A configuration problem; the message names the key and what is wrong."""


def ae_title(key: str, value: str) -> None:
    if not 0 < len(value) <= 16 or "\\" in value or not value.isprintable():
        raise FieldError(f"{key}: an AE title is 1-16 printable characters, got {value!r}")


def port(key: str, value: int) -> None:
    if not 0 <= value <= 65535:
        raise FieldError(f"{key}: port must be 0-65535, got {value}")


def positive(key: str, value: float) -> None:
    if value <= 0:
        raise FieldError(f"{key}: must be > 0, got {value}")


def not_negative(key: str, value: float) -> None:
    if value < 0:
        raise FieldError(f"{key}: must be >= 0, got {value}")


def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise FieldError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")


def regex(key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise FieldError(f"{key}: not a valid regular expression: {err}") from None


def existing_file(key: str, path: Path | None) -> None:
    """A file that must exist (certificates, keys); None passes."""
    if path is not None and not path.is_file():
        raise FieldError(f"{key}: no such file {str(path)!r}")


def under(base: Path | None, path: Path) -> Path:
    """A configured path: relative ones start at ``base`` (the config file's folder) when given."""
    return path if path.is_absolute() or base is None else base / path
