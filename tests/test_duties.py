"""Background duties (pull runner, correction recognition, retention) as leases on the real store:
one node at a time does each, a node stopping gives its duties back, and a dead node's duty is
taken over once its lease expires. Several nodes are several Store objects (or processes) on one
database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.peers import wait_for
from vesalius.node.config import parse_config
from vesalius.node.leases import Leases
from vesalius.node.pull.jobs import create_job
from vesalius.node.pull.query import PullQuery
from vesalius.node.pull.runner import PullRunner
from vesalius.node.store import Store

SHORT = 0.5  # s: the lease of the unit tests
LEASE = 1.2  # s: the lease the heartbeat renews (every 0.4 s) in the two-node test

HOLDER = """
import sys, time
from pathlib import Path
from vesalius.node.leases import Leases
from vesalius.node.store import Store

leases = Leases(Store(Path(sys.argv[1]), sys.argv[2]), "A", float(sys.argv[3]))
leases.register()
assert leases.holds("pull")
leases.start()
print("holding", flush=True)
sys.stdin.read()  # until the test ends: it closes this pipe (or dies)
"""


def test_a_duty_is_held_by_one_node_renewed_and_taken_over_once_expired(
        database_url: str, tmp_path: Path) -> None:
    a, b = Store(tmp_path, database_url), Store(tmp_path, database_url)
    assert a.take_duties("A", ["pull", "retention"], SHORT) == {"pull", "retention"}
    assert b.take_duties("B", ["pull", "retention", "corrections"], SHORT) == {"corrections"}
    time.sleep(SHORT + 0.1)
    assert a.take_duties("A", ["pull"], SHORT) == {"pull"}  # its holder renews it: good for SHORT
    assert b.take_duties("B", ["pull", "retention"], SHORT) == {"retention"}  # A let retention lapse
    time.sleep(SHORT + 0.1)
    # A stopped renewing pull: expired, taken over
    assert b.take_duties("B", ["pull", "retention"], SHORT) == {"pull", "retention"}
    assert a.take_duties("A", ["pull", "retention"], SHORT) == set()
    owners = {r["name"]: r["owner"] for r in a.query("SELECT name, owner FROM duties")}
    assert owners == {"pull": "B", "retention": "B", "corrections": "B"}


def test_a_node_stopping_gives_its_duties_back(database_url: str, tmp_path: Path) -> None:
    a = Leases(Store(tmp_path, database_url), "A", 30)
    b = Leases(Store(tmp_path, database_url), "B", 30)
    a.register()
    b.register()
    assert a.holds("pull") and a.holds("retention")
    assert not b.holds("pull") and not b.holds("retention")
    b.renew()
    assert not b.holds("pull")  # A's lease of 30 s holds
    a.stop()
    assert not a.holds("pull")
    b.renew()  # B's next heartbeat takes them at once, without waiting for a lease to expire
    assert b.holds("pull") and b.holds("retention")


def test_only_the_holder_runs_the_pull_duty_and_another_node_takes_it_after_a_kill_9(
        database_url: str, tmp_path: Path) -> None:
    """Node A (a process) holds the pull duty; node B's pull runner, running beside it, leaves the
    pull jobs alone until A is killed -9, then takes the duty over and carries on with them: the
    queued one is worked (its source is not configured here: failed) and the running one resumed
    (no study left: done)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), database_url, str(LEASE)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    stopping = threading.Event()
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        store = Store(tmp_path, database_url)
        queued = create_job(store, "elsewhere", PullQuery(), "test")
        running = create_job(store, "elsewhere", PullQuery(), "test")
        with store.transaction() as db:
            db.execute("UPDATE pull_jobs SET state='running' WHERE id=?", (running,))
        leases = Leases(store, "B", LEASE)
        leases.register()
        leases.start()
        runner = PullRunner(store, parse_config({"data_dir": str(tmp_path)}), stopping,
                            on_duty=lambda: leases.holds("pull"))
        runner.thread.start()
        time.sleep(2 * LEASE)  # A's heartbeat keeps the duty: B's runner does nothing
        assert {r["id"]: r["state"] for r in store.query("SELECT id, state FROM pull_jobs")} == {
            queued: "queued", running: "running"}
        os.killpg(holder.pid, signal.SIGKILL)
        def states() -> dict[int, str]:
            return {r["id"]: r["state"] for r in store.query("SELECT id, state FROM pull_jobs")}

        wait_for(lambda: states() == {queued: "failed", running: "done"}, 10 * LEASE,
                 "B to take the pull duty and work both jobs")
        assert "not configured" in store.query("SELECT error FROM pull_jobs WHERE id=?", (queued,))[0][0]
        assert store.query("SELECT owner FROM duties WHERE name='pull'")[0][0] == "B"
        stopping.set()
        runner.shutdown()
        leases.stop()
        assert store.query("SELECT COUNT(*) FROM duties")[0][0] == 0
    finally:
        stopping.set()
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
