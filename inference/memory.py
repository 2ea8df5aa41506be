"""Give memory freed by a finished stage back to the operating system.

glibc keeps freed heap memory in its per-thread arenas: after the threaded decode of a 300-slice
series about 200 MB that no object uses any more stays resident, and the next stage's peak adds
to it. ``malloc_trim(0)`` returns those pages (a few ms). Elsewhere (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from typing import Any


@cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def release_free_memory() -> bool:
    """Return freed heap pages to the OS; True when the C library could (glibc)."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
