"""The node as a well-behaved service: its worker processes never outlive it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.peers import process_alive, vesalius_node, wait_for, worker_pids


def test_workers_die_with_the_node_after_kill_9(tmp_path: Path) -> None:
    with vesalius_node(tmp_path) as node:
        workers = wait_for(lambda: worker_pids(node.proc.pid), 60, "the node's worker process")
        os.kill(node.proc.pid, signal.SIGKILL)  # the node alone: nobody signals its workers
        node.proc.wait(timeout=10)
        wait_for(lambda: not any(process_alive(pid) for pid in workers), 30,
                 f"the orphaned workers {workers} to end")
