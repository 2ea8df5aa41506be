"""node.forked: a writer in a forked child, its file, its errors and its end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vesalius.node.forked import ForkedCall


def test_the_child_sees_the_parents_memory_and_its_file_is_there_after_result(tmp_path: Path) -> None:
    data = np.arange(1_000_000, dtype=np.int64)  # inherited, never pickled
    target = tmp_path / "sum.txt"
    writer = ForkedCall(lambda: target.write_text(str(int(data.sum()))), name="summer")
    writer.result()
    assert target.read_text() == str(int(data.sum()))


def test_the_childs_exception_is_raised_in_the_parent() -> None:
    def fail() -> None:
        raise ValueError("no label has any voxel")

    with pytest.raises(ValueError, match="no label has any voxel"):
        ForkedCall(fail, name="failing writer").result()


def test_an_exception_that_does_not_pickle_still_arrives_as_text() -> None:
    class Local(Exception):  # defined in a function: pickle cannot find it again
        pass

    def fail() -> None:
        raise Local("broken frame")

    with pytest.raises(RuntimeError, match="Local: broken frame"):
        ForkedCall(fail, name="failing writer").result()


def test_a_child_killed_without_answering_is_an_error_naming_it(tmp_path: Path) -> None:
    writer = ForkedCall(lambda: os.kill(os.getpid(), signal.SIGKILL), name="the BINARY SEG writer")
    with pytest.raises(RuntimeError, match=r"the BINARY SEG writer died with exit code -9"):
        writer.result()


def test_close_ends_a_child_still_running(tmp_path: Path) -> None:
    started = tmp_path / "started"
    writer = ForkedCall(lambda: (started.touch(), time.sleep(60)), name="slow writer")
    deadline = time.monotonic() + 10
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    begun = time.monotonic()
    writer.close()
    assert time.monotonic() - begun < 5
    assert not writer._process.is_alive()
    assert writer._process.exitcode == -signal.SIGTERM


def test_the_child_dies_with_a_parent_killed_mid_job(tmp_path: Path) -> None:
    """A worker killed by the node (kill -9) leaves no SEG child writing into the job folder."""
    child_pid = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from vesalius.node.forked import ForkedCall\n"
        f"target = Path({str(child_pid)!r})\n"
        "writer = ForkedCall(lambda: (target.write_text(str(os.getpid())), time.sleep(120)),"
        " name='slow writer')\n"
        "time.sleep(120)\n")])
    try:
        deadline = time.monotonic() + 30
        while not (child_pid.exists() and child_pid.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = int(child_pid.read_text())
        os.kill(pid, 0)  # alive while its parent is
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
    finally:
        parent.kill()
        parent.wait(timeout=10)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by init, counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
