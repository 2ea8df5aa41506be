"""Every path the node writes is built here, so none can leave its root.

Values that come from outside (UIDs from the network, structure names from a model's
configuration) become file names only through :func:`safe_name` / :func:`uid_file_name`, and the
joined path is checked by :func:`inside` before anything is written.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from pydicom.uid import UID

_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


class UnsafePath(ValueError):
    """A path that would resolve outside the folder it must stay in."""


def inside(root: str | Path, *parts: str) -> Path:
    """``root / parts...``, resolved, and guaranteed to lie strictly inside ``root``; each part
    must be one plain name (no separator, NUL, ``.`` or ``..``)."""
    base = Path(root).resolve()
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\x00" in part:
            raise UnsafePath(f"a path component under {base} is not a plain name")
    path = base.joinpath(*parts).resolve()
    if path == base or not path.is_relative_to(base):
        raise UnsafePath(f"a path component would leave {base}")
    return path


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def safe_name(text: str) -> str:
    """``text`` itself when it is a plain file name (letters, digits, ``._+-``, not starting with a
    dot, at most 100 characters); otherwise its characters outside that set replaced, and a short
    hash appended so that two different names never meet."""
    if _SAFE.fullmatch(text):
        return text
    cleaned = re.sub(r"[^A-Za-z0-9._+-]", "_", text)[:60].lstrip("._") or "x"
    return f"{cleaned}-{_digest(text)[:12]}"


def uid_file_name(uid: str) -> str:
    """The file or folder name of a UID: the UID itself when it is valid by the letter of PS3.5
    (digits and dots, no leading zeros, at most 64 characters), else ``x`` and a hash of it, so
    that tolerated but irregular UIDs (leading zeros) never become a name."""
    if UID(uid).is_valid and uid.strip() == uid:
        return uid
    return f"x{_digest(uid)}"
