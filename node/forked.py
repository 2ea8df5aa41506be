"""Run a GIL-bound writer in a forked child process, so it takes the second core for real.

The BINARY SEG is ~1 200 per-frame functional group items built and encoded by pydicom and
highdicom in pure Python: in a thread it holds the GIL, and the surfaces and measures beside it
wait for it (measured: no gain from the thread at all). A forked child inherits the label map,
the volume and its source headers copy-on-write, so nothing is pickled; it writes one file and
exits, and the parent reads back the header it needs. Only the forking thread exists in the
child, which runs numpy, pydicom and highdicom only (no torch, no VTK, no network), so the locks
that other threads of the parent may hold are never needed there.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies, even by ``kill -9`` (Linux; a
    no-op elsewhere), and exit now if the parent is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


class ForkedCall:
    """``call()`` running in a forked child; ``result()`` waits and raises what it raised."""

    def __init__(self, call: Callable[[], Any], name: str) -> None:
        context = multiprocessing.get_context("fork")
        self.name = name
        self._outcome, sender = context.Pipe(duplex=False)
        # daemon: ended with the parent, never left writing into a job folder nobody waits for
        # and killed with it (a worker killed mid-job leaves no child writing into a folder that
        # the job's next attempt recreates)
        self._process = context.Process(target=_run, args=(call, sender, os.getpid()), name=name,
                                        daemon=True)
        # The parent's collections would write into every object's header, copying each page
        # the child shares: the objects of now are left out of them (gc.freeze: ~40 MB less).
        gc.freeze()
        self._process.start()
        sender.close()  # the child holds the only sending end: its exit is the pipe's end

    def result(self) -> None:
        """Wait for the child; re-raise its exception, or say how it died without one."""
        try:
            error = self._outcome.recv()
        except EOFError:  # killed (out of memory, a signal) before it could answer
            self._ended()
            raise RuntimeError(f"{self.name} died with exit code {self._process.exitcode}") from None
        self._ended()
        if error is not None:
            raise error

    def close(self) -> None:
        """End the child if it still runs (the job failed, or no longer needs it) and reap it."""
        if self._process.is_alive():
            self._process.terminate()
        self._ended()

    def _ended(self) -> None:
        self._process.join()
        self._outcome.close()
        gc.unfreeze()  # once per child (a second call finds nothing frozen)


def _run(call: Callable[[], Any], sender: Connection, parent: int) -> None:
    die_with_parent(parent)
    try:
        call()
    except BaseException as exc:  # every failure goes back to the parent, which raises it
        try:
            sender.send(exc)
        except Exception:  # an exception that does not pickle: its text still does
            sender.send(RuntimeError(f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    sender.send(None)
