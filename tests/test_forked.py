"""node.forked: a writer in a forked child, its file, its errors and its end."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
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


def _ready(fd: int, seconds: float) -> bool:
    """Whether ``fd`` has something to read (or its end) within ``seconds``."""
    return bool(select.select([fd], [], [], seconds)[0])


def test_close_ends_a_child_still_running() -> None:
    started, ready = os.pipe()
    writer = ForkedCall(lambda: (os.write(ready, b"1"), signal.pause()), name="slow writer")
    os.close(ready)
    try:
        assert _ready(started, 10) and os.read(started, 1) == b"1"  # it runs, waiting for a signal
    finally:
        os.close(started)
    writer.close()
    assert not writer._process.is_alive()
    assert writer._process.exitcode == -signal.SIGTERM


def test_the_child_dies_with_a_parent_killed_mid_job() -> None:
    """A worker killed by the node (kill -9) leaves no SEG child writing into the job folder."""
    # The child holds the write end of a pipe; the test reads its pid from it, then the pipe's
    # end once every holder (the parent and its child) is gone.
    alive, holder = os.pipe()
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, signal\n"
        "from vesalius.node.forked import ForkedCall\n"
        f"holder = {holder}\n"
        "writer = ForkedCall(lambda: (os.write(holder, str(os.getpid()).encode()), signal.pause()),"
        " name='slow writer')\n"
        "signal.pause()\n")], pass_fds=(holder,))
    os.close(holder)
    try:
        assert _ready(alive, 30), "the child did not start"
        pid = int(os.read(alive, 32))
        os.kill(pid, 0)  # alive while its parent is
        parent.kill()
        parent.wait(timeout=10)
        assert _ready(alive, 10) and os.read(alive, 32) == b"", "the child outlived its parent"
    finally:
        os.close(alive)
        parent.kill()
        parent.wait(timeout=10)
