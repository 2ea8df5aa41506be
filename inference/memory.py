"""Give memory freed by a finished stage back to the operating system.

glibc keeps freed heap memory in its per-thread arenas: after the threaded decode of a 300-slice
series about 200 MB that no object uses any more stays resident, and the next stage's peak adds
to it. ``malloc_trim(0)`` returns those pages (a few ms). Elsewhere (musl, macOS) it does nothing.

Within a stage, the same: glibc serves a block below its mmap threshold from the heap arena of the
thread that asks, and that threshold grows to 32 MB as blocks are freed, so the model's two threads
(inference.models.builtin_ct) each kept their own freed masks and slabs, and the job's peak grew by
~70 MB. A fixed 4 MB threshold maps every large array on its own and unmaps it when freed.
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
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def release_free_memory() -> bool:
    """Return freed heap pages to the OS; True when the C library could (glibc)."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


M_MMAP_THRESHOLD = -3  # glibc's malloc.h
LARGE_BLOCK = 4 << 20  # a 512x512 slice of float32 is 1 MB: volumes, masks and slabs are above


def map_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Give every block of ``threshold`` bytes or more its own mapping, returned to the OS when
    freed, in whichever thread; True when the C library could (glibc). Set once per worker."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold))
