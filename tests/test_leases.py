"""Claims as leases, on the real store: a dead node's job or delivery is taken over once its lease
expires, a live node's heartbeat keeps its claims, and a node whose claim was taken over records
nothing (fencing). Several nodes are several Store objects on one database file, each in its own
thread (its own SQLite connection, as another process has)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from vesalius.node.checks import ConfigError
from vesalius.node.config import parse_config
from vesalius.node.leases import Leases
from vesalius.node.series import complete_due_series
from vesalius.node.store import Claim, SeriesInfo, Store

SHORT = 0.5  # s: the lease of these tests
BEAT = 1.2  # s: the lease the heartbeat test renews (every 0.4 s: late by up to 0.8 s on a busy machine)


def _job(store: Store, series: str = "1.2.3") -> int:
    with store.transaction() as db:
        return store.add_job(db, series, "rule", "builtin_ct", ["pacs"])


def _expire() -> None:
    time.sleep(SHORT + 0.1)


def test_a_dead_nodes_job_is_taken_over_and_its_late_result_refused(
        database_url: str, tmp_path: Path) -> None:
    store = Store(tmp_path, database_url)
    job = _job(store)
    a = store.claim_job("A", SHORT, max_attempts=3)
    assert a is not None and (a["id"], a["lease_owner"], a["attempts"]) == (job, "A", 1)
    assert store.claim_job("B", SHORT, max_attempts=3) is None  # A's lease holds
    _expire()
    b = store.claim_job("B", SHORT, max_attempts=3)
    assert b is not None and (b["id"], b["lease_owner"], b["attempts"]) == (job, "B", 2)
    assert "attempt 1 on node A ended without a result: its lease expired" in b["error"]
    # A comes back: neither its result nor its failure is recorded, and it queues no deliveries
    assert not store.finish_job(job, tmp_path / "a", {"model": 1.0}, ["pacs"], Claim.of(a))
    assert not store.fail_job(job, "A's error", retry=True, claim=Claim.of(a))
    assert store.query("SELECT COUNT(*) FROM deliveries")[0][0] == 0
    assert store.job(job)["state"] == "running" and store.job(job)["lease_owner"] == "B"
    assert store.finish_job(job, tmp_path / "b", {"model": 1.0}, ["pacs"], Claim.of(b))
    row = store.job(job)
    assert (row["state"], row["result_dir"], row["error"]) == ("done", str(tmp_path / "b"), None)
    assert row["lease_owner"] is None
    assert store.query("SELECT COUNT(*) FROM deliveries")[0][0] == 1


def test_a_job_whose_nodes_keep_dying_fails_after_job_attempts(database_url: str, tmp_path: Path) -> None:
    store = Store(tmp_path, database_url)
    job = _job(store)
    for node in ("A", "B"):
        assert store.claim_job(node, SHORT, max_attempts=2)["id"] == job
        _expire()  # the node dies
    assert store.claim_job("C", SHORT, max_attempts=2) is None
    row = store.job(job)
    assert row["state"] == "failed" and row["attempts"] == 2
    assert "attempt 2 on node B ended without a result: its lease expired" in row["error"]


def test_the_heartbeat_keeps_a_long_job_and_a_delivery_and_notices_a_takeover(
        database_url: str, tmp_path: Path) -> None:
    store = Store(tmp_path, database_url)
    job = _job(store)
    leases = Leases(store, "A", BEAT)
    leases.register()
    claimed = store.claim_job("A", BEAT)
    leases.hold("jobs", job, Claim.of(claimed))
    store.finish_job(_job(store, "4.5.6"), tmp_path, {}, ["pacs"])
    delivery = store.claim_delivery("A", BEAT)
    leases.hold("deliveries", delivery["id"], Claim.of(delivery))
    leases.start()
    try:
        time.sleep(3 * BEAT)  # the job runs three leases long; the heartbeat renews it
        assert store.claim_job("B", SHORT) is None and store.claim_delivery("B", SHORT) is None
    finally:
        leases.stop()  # the node dies: nothing renews its claims
    time.sleep(BEAT + 0.1)
    taken = store.claim_job("B", SHORT)
    assert taken["id"] == job and taken["attempts"] == 2
    assert store.claim_delivery("B", SHORT)["id"] == delivery["id"]
    leases.hold("jobs", job, Claim.of(claimed))  # A's heartbeat comes back: it finds both taken
    assert sorted(leases.renew()) == [f"deliveries {delivery['id']}", f"jobs {job}"]


def test_a_dead_senders_delivery_is_taken_over_and_its_late_outcome_refused(
        database_url: str, tmp_path: Path) -> None:
    store = Store(tmp_path, database_url)
    job = _job(store)
    store.finish_job(job, tmp_path, {}, ["pacs"])
    a = store.claim_delivery("A", SHORT)
    assert a is not None and a["result_dir"] == str(tmp_path) and a["attempts"] == 0
    assert store.claim_delivery("B", SHORT) is None  # being sent by A: not sent by B at the same time
    _expire()
    b = store.claim_delivery("B", SHORT)
    assert b["id"] == a["id"] and b["attempts"] == 1 and "the try of node A" in b["error"]
    assert not store.record_delivery(a["id"], "done", None, time.time(), Claim.of(a))
    assert store.record_delivery(b["id"], "done", None, time.time(), Claim.of(b))
    row = store.query("SELECT * FROM deliveries")[0]
    assert (row["state"], row["attempts"], row["lease_owner"]) == ("done", 2, None)
    assert store.claim_delivery("C", SHORT) is None


def test_a_rerun_revokes_the_claim_of_a_delivery_in_flight(database_url: str, tmp_path: Path) -> None:
    """The job ran again while its old results were being sent: the old try's outcome is not
    recorded, and the new results are due at once."""
    store = Store(tmp_path, database_url)
    job = _job(store)
    store.finish_job(job, tmp_path, {}, ["pacs"])
    sending = store.claim_delivery("A", 30)
    store.finish_job(job, tmp_path, {}, ["pacs"])  # the re-run's results
    assert not store.record_delivery(sending["id"], "done", None, time.time(), Claim.of(sending))
    again = store.claim_delivery("A", 30)
    assert again is not None and again["id"] == sending["id"]


def test_start_up_takes_back_only_this_nodes_claims(database_url: str, tmp_path: Path) -> None:
    store = Store(tmp_path, database_url)
    mine, theirs, legacy = _job(store), _job(store), _job(store)
    assert store.claim_job("A", 30)["id"] == mine
    assert store.claim_job("B", 30)["id"] == theirs
    with store.transaction() as db:  # running when a version before leases stopped
        db.execute("UPDATE jobs SET state='running' WHERE id=?", (legacy,))
    store.finish_job(mine, tmp_path, {}, ["pacs"])
    with store.transaction() as db:
        db.execute("UPDATE jobs SET state='running', lease_owner='A' WHERE id=?", (mine,))
    delivery = store.claim_delivery("A", 30)
    assert store.requeue_interrupted_jobs("A") == 2  # its own and the legacy one
    states = {r["id"]: (r["state"], r["lease_owner"]) for r in store.query("SELECT * FROM jobs")}
    assert states == {mine: ("queued", None), theirs: ("running", "B"), legacy: ("queued", None)}
    assert store.claim_delivery("B", 30)["id"] == delivery["id"]  # free again at once


def test_claims_from_several_nodes_at_once_take_each_job_once(database_url: str, tmp_path: Path) -> None:
    jobs = {_job(Store(tmp_path, database_url), f"1.2.{i}") for i in range(30)}
    taken: dict[str, list[int]] = {}

    def node(name: str) -> None:
        store = Store(tmp_path, database_url)
        mine = taken.setdefault(name, [])
        while (job := store.claim_job(name, 30)) is not None:
            mine.append(job["id"])

    threads = [threading.Thread(target=node, args=(f"N{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    claims = [job for mine in taken.values() for job in mine]
    assert sorted(claims) == sorted(jobs)  # every job once, none twice


def test_a_second_live_node_of_the_same_name_is_refused(database_url: str, tmp_path: Path) -> None:
    store = Store(tmp_path, database_url)
    other = subprocess.Popen(["sleep", "60"])  # a live process of this host: "another node A"
    try:
        with store.transaction() as db:
            db.execute("INSERT INTO nodes VALUES ('A', ?, ?, ?, ?)",
                       (os.uname().nodename, other.pid, time.time(), time.time()))
        with pytest.raises(ConfigError, match="another node named 'A' is running"):
            Leases(store, "A", 30).register()
        Leases(store, "B", 30).register()  # another name is another node
    finally:
        other.kill()
        other.wait()
    Leases(store, "A", 30).register()  # its process ended (kill -9, then a restart): the same node
    with store.transaction() as db:  # a node of that name on another host, alive
        db.execute("UPDATE nodes SET host='elsewhere', last_seen=? WHERE node_name='A'", (time.time(),))
    with pytest.raises(ConfigError, match="host elsewhere"):
        Leases(store, "A", 30).register()
    with store.transaction() as db:  # ... that stopped renewing: dead
        db.execute("UPDATE nodes SET last_seen=? WHERE node_name='A'", (time.time() - 31,))
    Leases(store, "A", 30).register()


# --- series completion from shared state ------------------------------------------------------------

LEASE = 30  # s; the tests below move their clock up to 10 s on, within a lease
CONFIG = {"quiet_period": 5, "stability_timeout": 60, "lease_seconds": LEASE,
          "rules": [{"name": "all", "trigger": "series", "select": "all"}]}
UID = "1.2.826.0.1.3"
SERIES = SeriesInfo(UID, "1.2.826.0.1.1", "CT", "1.2.840.10008.5.1.4.1.1.2", "", "", "")


def _store_instance(store: Store, n: int) -> None:
    store.store_instance(SERIES, f"1.2.826.0.1.3.{n}", b"not read by these tests", "SCANNER")


def _due(store: Store, now: float) -> list[str]:
    return complete_due_series(store, parse_config(CONFIG), now=now)


def test_two_listeners_one_series_completes_once_after_the_last_association(
        database_url: str, tmp_path: Path) -> None:
    a, b = Store(tmp_path, database_url), Store(tmp_path, database_url)
    a.open_association("A", "1", UID)
    _store_instance(a, 1)
    b.open_association("B", "1", UID)
    _store_instance(b, 2)
    # A's association ends with a normal release while B's is still open: not alone, and no
    # completion while B's is open, however long the quiet period
    assert a.close_association("A", "1", [UID], True, LEASE) == []
    assert _due(a, time.time() + 10) == [] and _due(b, time.time() + 10) == []
    assert b.close_association("B", "1", [UID], True, LEASE) == [UID]
    # sent over two associations: the quiet period, not complete at once
    assert _due(b, time.time()) == []
    later = time.time() + 6
    assert _due(a, later) == [UID] and _due(b, later) == []
    assert a.query("SELECT COUNT(*) FROM jobs")[0][0] == 1


def test_a_dead_listeners_open_association_does_not_hold_a_series(database_url: str, tmp_path: Path) -> None:
    store = Store(tmp_path, database_url)
    store.open_association("A", "1", UID)  # A dies: its row is renewed no more
    with store.transaction() as db:
        db.execute("UPDATE open_associations SET last_seen=?", (time.time() - LEASE - 1,))
    store.open_association("B", "1", UID)
    _store_instance(store, 1)
    assert store.close_association("B", "1", [UID], True, LEASE) == [UID]
    assert _due(store, time.time()) == [UID]  # one association, released: at once


def test_completion_in_several_nodes_at_once_makes_one_job(database_url: str, tmp_path: Path) -> None:
    store = Store(tmp_path, database_url)
    _store_instance(store, 1)
    store.mark_released([UID])
    later, done = time.time() + 6, []
    threads = [threading.Thread(target=lambda: done.extend(_due(Store(tmp_path, database_url), later)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert done == [UID]
    assert store.query("SELECT COUNT(*) FROM jobs")[0][0] == 1
