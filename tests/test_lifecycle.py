"""The node as a well-behaved service: it stops promptly and cleanly, and its worker processes
never outlive it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.peers import process_alive, storescp, storescu, vesalius_node, wait_for, worker_pids
from tests.phantoms import write_phantom_series
from tests.test_e2e import CHEST
from vesalius.node.store import Store


def test_workers_die_with_the_node_after_kill_9(tmp_path: Path) -> None:
    with vesalius_node(tmp_path) as node:
        workers = wait_for(lambda: worker_pids(node.proc.pid), 60, "the node's worker process")
        os.kill(node.proc.pid, signal.SIGKILL)  # the node alone: nobody signals its workers
        node.proc.wait(timeout=10)
        wait_for(lambda: not any(process_alive(pid) for pid in workers), 30,
                 f"the orphaned workers {workers} to end")


def test_ctrl_c_mid_job_and_sigterm_stop_cleanly_and_the_job_runs_at_the_next_start(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while a job runs: the
    node exits 0 promptly, with no traceback, and the job is queued again; after a restart it runs
    and is delivered; SIGTERM (docker stop, systemd) stops the idle node the same way."""
    series = write_phantom_series(tmp_path / "ct", shape=(60, 256, 256), spacing=(2.0, 1.2, 1.2),
                                  objects=CHEST)
    data = tmp_path / "data"
    with storescp(tmp_path / "pacs") as pacs:
        with vesalius_node(tmp_path, data_dir=data, destinations=[pacs.address]) as node:
            storescu(series.paths, node.port)
            wait_for(lambda: "job start" in node.log(), 60, "the job to start")
            os.killpg(node.proc.pid, signal.SIGINT)
            assert node.proc.wait(timeout=15) == 0  # a hang waiting for the job would time out
            log = node.log()
        assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
        assert "1 interrupted job(s) queued again" in log
        assert [j["state"] for j in Store(data).listing("jobs")] == ["queued"]
        with vesalius_node(tmp_path, data_dir=data, destinations=[pacs.address]) as node:
            wait_for(lambda: node.delivered(1), 180, "the job's results at the PACS")
            node.proc.send_signal(signal.SIGTERM)
            assert node.proc.wait(timeout=15) == 0
            assert "Traceback" not in node.log()
        assert [j["state"] for j in Store(data).listing("jobs")] == ["done"]
