"""The store's behaviour on both databases: SQLite in data_dir and a real PostgreSQL
(tests/postgres_peer.py), the same assertions for each (the ``database_url`` fixture); then what
only one of them has: adopting an earlier SQLite database, and PostgreSQL restarting under the store.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.earlier_schema import EARLIER_SQLITE_SCHEMA
from tests.postgres_peer import PostgresPeer
from vesalius.node import database
from vesalius.node.audit import Audit, read_events
from vesalius.node.config import parse_config
from vesalius.node.database import migrations, to_pyformat
from vesalius.node.evaluations import record as record_evaluation
from vesalius.node.store import SeriesInfo, Store, deid_mapping, record_progress

INFO = SeriesInfo("1.2.3.1", "1.2.3", "CT", "1.2.840.10008.5.1.4.1.1.2", "chest", "CHEST", "ACME")


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> Store:
    return Store(tmp_path / "data", database_url)


def test_a_new_database_is_at_the_latest_migration_and_a_restart_migrates_nothing(
        store: Store, database_url: str, tmp_path: Path) -> None:
    latest = len(migrations(store.dialect))
    rows = store.query("SELECT version, name FROM schema_migrations ORDER BY version")
    assert [tuple(r) for r in rows] == [(m.version, m.name) for m in migrations(store.dialect)]
    assert latest >= 1 and rows[-1]["version"] == latest
    applied_at = store.query("SELECT applied_at FROM schema_migrations")[0][0]
    assert database.migrate(store._connection()) == []  # every migration is there already
    Store(tmp_path / "data", database_url)  # a restart of the node
    assert tuple(store.query("SELECT COUNT(*), MIN(applied_at) FROM schema_migrations")[0]) == \
        (latest, applied_at)


def test_both_dialects_have_the_same_migrations() -> None:
    names = [[(m.version, m.name) for m in migrations(d)] for d in (database.SQLITE, database.POSTGRES)]
    assert names[0] == names[1]


def test_instances_series_jobs_and_deliveries_through_their_lifecycle(store: Store, tmp_path: Path) -> None:
    assert store.store_instance(INFO, "1.2.3.1.1", b"DICM one", "SCANNER") is True
    assert store.store_instance(INFO, "1.2.3.1.1", b"DICM one again", "SCANNER") is False  # the same UID
    assert store.store_instance(INFO, "1.2.3.1.2", b"DICM two", "SCANNER") is True
    assert len(store.series_paths(INFO.series_instance_uid)) == 2
    store.mark_released([INFO.series_instance_uid], normally=[INFO.series_instance_uid])
    [series] = store.query("SELECT * FROM series")
    assert (series["associations"], series["released_normally"], series["state"]) == (1, 1, "receiving")

    with store.transaction() as db:
        first = store.add_job(db, INFO.series_instance_uid, "ct", "builtin_ct", ["pacs", "archive"])
        second = store.add_job(db, INFO.series_instance_uid, "ct", "other", [], result_key="study/1.2.3/ct")
    assert second == first + 1
    claimed = store.claim_job()
    assert claimed is not None
    assert (claimed["id"], claimed["state"], claimed["attempts"]) == (first, "running", 1)
    record_progress(store.url, first, "surfaces", 3, 5)  # from a worker process: its own connection
    assert json.loads(store.job(first)["progress"])["stage"] == "surfaces"
    store.finish_job(first, tmp_path / "results", {"model": 1.5}, ["pacs", "archive"])
    job = store.job(first)
    assert (job["state"], json.loads(job["stages"]), job["result_dir"]) == ("done", {"model": 1.5},
                                                                           str(tmp_path / "results"))
    due = store.due_deliveries()
    assert [(d["destination"], d["result_dir"]) for d in due] == [("pacs", str(tmp_path / "results")),
                                                                  ("archive", str(tmp_path / "results"))]
    store.record_delivery(due[0]["id"], "done", None, time.time())
    store.record_delivery(due[1]["id"], "pending", "refused", time.time() + 3600)
    assert store.due_deliveries() == []
    assert store.counts("deliveries", ("pending", "done", "failed")) == {"pending": 1, "done": 1, "failed": 0}
    assert store.resend_job(first) == 2 and len(store.due_deliveries()) == 2
    assert store.retry_job(first) is True and store.job(first)["state"] == "queued"
    assert store.retry_job(10_000) is False

    again = store.claim_job()  # the oldest queued first
    assert again is not None and again["id"] == first
    assert store.requeue_interrupted_jobs() == 1  # the node stopped while it ran
    assert store.counts("jobs", ("queued", "running", "done", "failed"))["queued"] == 2
    store.fail_job(second, "no", retry=False)
    assert store.job(second)["state"] == "failed" and store.job(second)["error"] == "no"


def test_counters_only_ever_increase(store: Store) -> None:
    for by in (1, 1, 5):
        with store.transaction() as db:
            store.bump(db, "series_completed", by)
    assert store.counter("series_completed") == 7 and store.counter("never_bumped") == 0


def test_a_failed_transaction_leaves_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction() as db:
        store.bump(db, "c")
        raise RuntimeError("half-way")
    with pytest.raises(database.IntegrityError), store.transaction() as db:
        db.execute("INSERT INTO counters VALUES ('twice', 1)")
        db.execute("INSERT INTO counters VALUES ('twice', 1)")
    assert store.query("SELECT COUNT(*) FROM counters WHERE name IN ('c', 'twice')")[0][0] == 0
    with store.transaction() as db:  # and the connection works on
        store.bump(db, "c")
    assert store.counter("c") == 1


def completed_study(store: Store) -> None:
    """Two series of one study, one chosen, one skipped because the other ranks higher; a job with
    an evaluation."""
    store.store_instance(INFO, "1.2.3.1.1", b"x", "SCANNER")
    thick = SeriesInfo("1.2.3.2", "1.2.3", "CT", INFO.sop_class_uid, "thick", "CHEST", "ACME")
    store.store_instance(thick, "1.2.3.2.1", b"x", "CT2")
    now = time.time()
    with store.transaction() as db:
        db.execute("UPDATE series SET state='complete', completed_at=?", (now,))
        store.record_selection(db, "1.2.3", "ct", [
            ("1.2.3.1", "chosen", "thinnest"), ("1.2.3.2", "skipped", "1.2.3.1 ranks higher on thickness")],
            now + 1)
        db.execute("INSERT INTO studies VALUES (?,?)", ("1.2.3", now + 1))
        store.save_facts(db, "1.2.3.1", {"slices": 1})
        store.save_facts(db, "1.2.3.1", {"slices": 2})  # replaced
        assert store.facts(db, "1.2.3.1") == {"slices": 2}
        store.add_job(db, "1.2.3.1", "ct", "builtin_ct", ["pacs"])


def test_listings_with_filters_study_and_json(store: Store) -> None:
    completed_study(store)
    series = {r["series_instance_uid"]: (r["state"], r["reason"], r["instances"])
              for r in store.listing("series")}
    assert series == {"1.2.3.1": ("complete", None, 1),
                      "1.2.3.2": ("stored", "not chosen: another series of the study ranks higher", 1)}
    assert [r["series_instance_uid"] for r in store.listing("series", state="stored")] == ["1.2.3.2"]
    assert [r["series_instance_uid"] for r in store.listing("series", ae="CT2")] == ["1.2.3.2"]
    assert store.listing("series", study="9.9") == [] and len(store.listing("series", study="1.2.3")) == 2
    [study] = store.listing("studies")
    assert study["series"] == 2 and [s["decision"] for s in study["selection"]] == ["chosen", "skipped"]
    assert store.listing("studies", ae="NOBODY") == []

    [job] = store.listing("jobs")
    assert (job["study_instance_uid"], job["calling_ae"], job["evaluation"], job["correction"]) == \
        ("1.2.3", "SCANNER", None, None)
    stored = record_evaluation(store, job["id"], "reference.seg", {"dice": {"liver": 0.9}}, via="cli")
    [job] = store.listing("jobs", study="1.2.3", state="queued")
    assert json.loads(job["evaluation"]) == {"id": stored["id"], "reference": "reference.seg",
                                             "evaluated_at": stored["evaluated_at"],
                                             "figures": {"dice": {"liver": 0.9}}}  # nested, not quoted
    assert store.listing("jobs", state="done") == [] and store.listing("jobs", before=job["id"]) == []
    assert store.listing("jobs", since=time.time() + 60) == []
    assert [d["destination"] for d in store.listing("deliveries", study="1.2.3")] == []
    with pytest.raises(ValueError, match="cannot be filtered by colour"):
        store.listing("jobs", colour="red")


def test_the_audit_trail_is_append_only(store: Store) -> None:
    trail = Audit(store)
    trail.record("Operator Action", user="admin", via="cli", job=1)
    [event] = read_events(store)
    assert (event["user"], event["details"]) == ("admin", {"job": 1, "via": "cli"})
    for statement in ("UPDATE audit SET \"user\"='someone else'", "DELETE FROM audit"):
        with pytest.raises(database.Error, match="append-only"), store.transaction() as db:
            db.execute(statement)
    assert len(read_events(store)) == 1


def test_pseudonyms_are_stable_and_reversible(store: Store) -> None:
    with deid_mapping(store) as mapping:
        first = mapping.pseudonym("patient_id", "PAT-1", lambda: "ANON-1")
        assert mapping.pseudonym("patient_id", "PAT-1", lambda: "ANON-2") == first == "ANON-1"
    with deid_mapping(store) as mapping:
        assert mapping.original("patient_id", "ANON-1") == "PAT-1"
        assert mapping.original("patient_id", "ANON-9") is None
    with pytest.raises(database.IntegrityError), deid_mapping(store) as mapping:  # a pseudonym is unique
        mapping.pseudonym("patient_id", "PAT-2", lambda: "ANON-1")


def test_placeholders_become_psycopg_ones_outside_literals() -> None:
    assert to_pyformat("SELECT '?%' || ? FROM t WHERE x LIKE '%a''?%' AND y=?") == \
        "SELECT '?%%' || %s FROM t WHERE x LIKE '%%a''?%%' AND y=%s"


def test_an_earlier_sqlite_database_is_adopted_with_its_rows(tmp_path: Path) -> None:
    data = tmp_path / "old"
    data.mkdir()
    old = sqlite3.connect(data / "vesalius.sqlite")
    old.executescript(EARLIER_SQLITE_SCHEMA)
    old.execute("INSERT INTO series VALUES ('9.1','9','CT','1.2','','','','SCANNER','complete',1,1,1,2)")
    old.execute("INSERT INTO instances VALUES ('9.1.1','9.1','1.2','/spool/x.dcm','SCANNER',1)")
    old.execute("INSERT INTO jobs (series_instance_uid, rule, model, destinations, state, created_at, "
                "updated_at) VALUES ('9.1','ct','builtin_ct','[\"pacs\"]','done',2,2)")
    old.execute("INSERT INTO deliveries (job_id, destination, next_try_at, updated_at) VALUES (1,'pacs',2,2)")
    old.commit()
    old.close()
    store = Store(data)
    versions = store.query("SELECT version FROM schema_migrations ORDER BY version")
    # the initial schema, then every later one
    assert [r[0] for r in versions] == [m.version for m in migrations(store.dialect)] == [1, 2, 3]
    assert store.query("SELECT part FROM deliveries")[0][0] == "all"  # 0003's default
    [job] = store.query("SELECT * FROM jobs")
    assert (job["series_instance_uid"], job["result_key"], job["progress"]) == ("9.1", None, None)
    assert [r["sop_instance_uid"] for r in store.query("SELECT * FROM instances")] == ["9.1.1"]
    assert store.query("SELECT associations FROM series")[0][0] == 0  # the added columns' defaults
    # its processed study is not redone
    assert tuple(store.query("SELECT study_instance_uid, selected_at FROM studies")[0]) == ("9", 2)
    assert len(store.due_deliveries()) == 1
    Store(data)
    assert store.query("SELECT COUNT(*) FROM schema_migrations")[0][0] == len(migrations(store.dialect))


# --- PostgreSQL only: migrations under a lock, a server restart ------------------------------------

def test_listeners_starting_together_migrate_once(postgres_server: PostgresPeer, tmp_path: Path) -> None:
    url = postgres_server.new_database()
    stores: list[Store] = []
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            stores.append(Store(tmp_path / f"node{i}", url))
        except BaseException as err:  # noqa: BLE001 - the assertion below reports it
            errors.append(err)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(stores) == 3
    latest = len(migrations(database.POSTGRES))
    assert stores[0].query("SELECT COUNT(*) FROM schema_migrations")[0][0] == latest


def test_the_store_reconnects_after_postgresql_restarts(
        postgres_server: PostgresPeer, tmp_path: Path) -> None:
    store = Store(tmp_path / "data", postgres_server.new_database())
    assert store.store_instance(INFO, "1.2.3.1.1", b"x", "SCANNER")
    assert database.shown("postgresql://u:secret@h:5/d") == "postgresql://u:***@h:5/d"
    postgres_server.stop("fast")
    try:
        with pytest.raises(database.OperationalError):  # what the listener answers A700 for
            store.store_instance(INFO, "1.2.3.1.2", b"x", "SCANNER")
        with pytest.raises(database.OperationalError):
            store.query("SELECT 1")
    finally:
        postgres_server.start()
    # the thread's connection died with the server: the next unit of work reconnects
    assert store.store_instance(INFO, "1.2.3.1.2", b"x", "SCANNER")
    postgres_server.restart()  # and a restart between two units of work goes unnoticed
    assert len(store.series_paths(INFO.series_instance_uid)) == 2  # a read
    with store.transaction() as db:  # a transaction, on the connection the read made
        store.bump(db, "after_restart")
    assert store.counter("after_restart") == 1


def test_the_database_url_is_checked() -> None:
    assert parse_config({"database": {"url": "postgresql://node@db:5432/vesalius"}}).database.url
    assert parse_config({}).database.url == ""
    with pytest.raises(Exception, match="database.url: expected"):
        parse_config({"database": {"url": "mysql://x"}})


def test_a_node_on_postgresql_carries_on_after_the_database_restarts(
        postgres_server: PostgresPeer, tmp_path: Path) -> None:
    """`vesalius serve` on the test PostgreSQL: a series in, results out; the database goes down
    (an instance sent meanwhile is refused with A700, not acknowledged; the loops wait) and comes
    back; the next series is delivered too, through one more restart, and nothing twice."""
    import pydicom
    import pydicom.errors

    from tests.peers import StoreSCP, send_raw, storescp, storescu, vesalius_node, wait_for
    from tests.test_faults import RESULTS, phantom

    def pacs_uids(pacs: StoreSCP, study_uid: str) -> list[str]:
        """The SOP Instance UIDs the PACS holds for a study (a file still being written is skipped)."""
        uids = []
        for path in pacs.files():
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                if ds.StudyInstanceUID == study_uid:
                    uids.append(str(ds.SOPInstanceUID))
            except (pydicom.errors.InvalidDicomError, EOFError, AttributeError):
                continue
        return uids

    first, second = phantom(tmp_path / "first", slices=12), phantom(tmp_path / "second", slices=12)
    url = postgres_server.new_database()
    config = f'study_quiet_period = 0.5\n[database]\nurl = "{url}"\n'
    with storescp(tmp_path / "pacs") as pacs, \
            vesalius_node(tmp_path, destinations=[pacs.address], config=config) as node:
        storescu(first.paths, node.port)
        wait_for(lambda: len(pacs_uids(pacs, first.study_uid)) >= RESULTS, 120, "the first series' results")
        postgres_server.stop("fast")
        try:
            assert send_raw(node.port, second.paths[0]) == 0xA700  # out of resources: not acknowledged
            wait_for(lambda: "database unavailable" in node.log(), 10, "the loops to notice")
            assert node.request("/jobs")[0] == 503
            # the refused association's audit event, made while the database is still down
            wait_for(lambda: "written to audit.jsonl only" in node.log(), 15, "the audit's fallback")
        finally:
            postgres_server.start()
        storescu(second.paths, node.port)
        postgres_server.restart()  # while the series completes and its job runs: every session ends
        wait_for(lambda: len(pacs_uids(pacs, second.study_uid)) >= RESULTS, 120, "the second series' results")
        wait_for(lambda: node.delivered(2), 30, "both deliveries recorded")
        assert [j["state"] for j in node.jobs()] == ["done", "done"]
        assert node.proc.poll() is None
        log = node.log()
    for study in (first.study_uid, second.study_uid):
        uids = pacs_uids(pacs, study)
        assert len(uids) == len(set(uids)) == RESULTS  # each object once
    assert "Traceback" not in log  # each loop said it in one line and carried on


def test_a_new_migration_is_one_file(store: Store, database_url: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """What a later version adds (here a column and a table) is one portable file, applied once at
    the next start, on both databases, and the rows stay."""
    with store.transaction() as db:
        job = store.add_job(db, "1.2", "ct", "builtin_ct", [])
    folder = tmp_path / "migrations"
    shutil.copytree(database.MIGRATIONS, folder)
    latest = len(database.migrations(store.dialect))
    (folder / "portable" / f"{latest + 1:04d}_priorities.sql").write_text(
        "ALTER TABLE jobs ADD COLUMN priority BIGINT;\n"
        "ALTER TABLE jobs ADD COLUMN deadline DOUBLE PRECISION;\n"
        "CREATE TABLE priorities (id TEXT PRIMARY KEY, node TEXT NOT NULL,\n"
        "    seen_at DOUBLE PRECISION);\n")
    monkeypatch.setattr(database, "MIGRATIONS", folder)
    restarted = Store(tmp_path / "data", database_url)
    rows = restarted.query("SELECT version FROM schema_migrations ORDER BY version")
    assert [r["version"] for r in rows] == list(range(1, latest + 2))
    assert restarted.job(job)["priority"] is None
    with restarted.transaction() as db:
        db.execute("INSERT INTO priorities VALUES ('a', 'node1', 1.5)")
    assert Store(tmp_path / "data", database_url).query(
        "SELECT COUNT(*) FROM schema_migrations")[0][0] == latest + 1


def test_a_starting_node_waits_for_its_database(postgres_server: PostgresPeer, tmp_path: Path) -> None:
    from vesalius.node.service import open_store

    config = parse_config({"data_dir": str(tmp_path / "data"),
                           "database": {"url": postgres_server.new_database()}})
    postgres_server.stop("fast")
    starter = threading.Timer(1.0, postgres_server.start)  # PostgreSQL comes up after the node
    starter.start()
    try:
        store = open_store(config, wait=30)
    finally:
        starter.join()
    assert store.query("SELECT COUNT(*) FROM schema_migrations")[0][0] >= 1
    postgres_server.stop("fast")
    try:
        with pytest.raises(database.OperationalError):  # and gives up after its wait
            open_store(config, wait=0)
    finally:
        postgres_server.start()
