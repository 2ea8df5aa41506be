"""Decoding while receiving: each compressed instance of a series a rule may process is decoded
in the background as soon as it is stored, so the job's volume stage finds most of its slices
decoded already (inference.series.decoded) instead of decoding them all once the series is
complete (JPEG 2000 costs 20-30 ms of CPU a slice).

Only while the association that brought an instance is still open: what is left when it ends is
dropped (the job decodes it, and would otherwise race this for the same slices). A thread per
core, at a lower priority than the listener's (``NICER``): on 2 cores one thread decoded half of
a 300-slice JPEG 2000 series during its transfer, two decoded all of it (docs/performance.md).
Nothing is decoded ahead while free space is below the retention high-water mark (or the
listener's floor), nor beyond ``MAX_QUEUED`` instances waiting (an association that stays open
for hours must not grow the queue without end), nor an instance that decodes to more than
16 MiB (a long multi-frame one, which the listener must not hold; ``read.DECODE_AHEAD_MAX_BYTES``).
A failure here changes nothing: the volume stage decodes the instance and reports what is wrong
with it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from vesalius.inference.series.read import decode_ahead
from vesalius.node.store import SeriesInfo, Store

log = logging.getLogger("vesalius.decode_ahead")
MAX_QUEUED = 1024  # instances waiting to be decoded ahead (3 series of 300 slices); more are left to the job
NICER = 10  # nice steps below the listener (300 J2K slices, 2 cores: transfer +0.6-1.4 s at 0, +0-0.9 at 10)


def _threads() -> int:
    """One per core this process may use, at most 4: the decoders release the GIL while they
    decode, not while they read a file and write what they decoded."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, usable or 1))


def _lower_priority() -> None:
    """Run this thread NICER steps below the listener's (Linux gives each thread its own nice
    value), so that acknowledging instances comes before decoding them."""
    if not sys.platform.startswith("linux"):  # elsewhere the id would name a process
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + NICER))
    except OSError:  # not allowed here: decode at the listener's priority
        pass


class DecodeAhead:
    """A background decoder for the listener; ``wanted`` says which series are worth it."""

    def __init__(self, store: Store, wanted: Callable[[SeriesInfo], bool], min_free_bytes: int = 0,
                 threads: int = 0, max_queued: int = MAX_QUEUED) -> None:
        self.store = store
        self.wanted = wanted
        self.min_free_bytes = min_free_bytes  # below this free space, nothing is decoded ahead
        self.max_queued = max_queued
        self._queued = 0  # submitted and not yet finished
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads or _threads(), thread_name_prefix="decode-ahead",
                                        initializer=_lower_priority)

    def submit(self, info: SeriesInfo, sop_instance_uid: str, assoc: Any) -> Future[None] | None:
        """Queue a stored compressed instance; ``assoc`` is the association it came on. None when
        the series is not wanted or ``max_queued`` instances wait already (the decoders cannot keep
        up: the job decodes the rest)."""
        if not self.wanted(info):
            return None
        with self._lock:
            if self._queued >= self.max_queued:
                return None
            self._queued += 1
        return self._pool.submit(self._decode, info, sop_instance_uid, assoc)

    def _decode(self, info: SeriesInfo, sop_instance_uid: str, assoc: Any) -> None:
        try:
            self._decode_if_still_receiving(info, sop_instance_uid, assoc)
        finally:
            with self._lock:
                self._queued -= 1

    def _decode_if_still_receiving(self, info: SeriesInfo, sop_instance_uid: str, assoc: Any) -> None:
        if not getattr(assoc, "is_established", False):  # released or aborted: the job decodes it
            return
        if shutil.disk_usage(self.store.spool_dir).free < self.min_free_bytes:
            return  # a cache must never be why retention removes data or the listener refuses it
        path = self.store.spool_path(info.study_instance_uid, info.series_instance_uid, sop_instance_uid)
        try:
            decode_ahead(path)
        except Exception as err:  # noqa: BLE001 - the volume stage decodes it again and says why
            log.debug("not decoded ahead (%s)", type(err).__name__)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
