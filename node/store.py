"""The one owner of durable state: the database (SQLite in data_dir, or a shared PostgreSQL;
node/database.py) and the spool of received files.

Every hand-over in the node is a row here: an instance is a row (and a fsynced file) before it is
acknowledged, a job is a row before it runs, a delivery is a row until the destination confirms.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from vesalius.node import database
from vesalius.node.database import Connection, Dialect, Row
from vesalius.node.paths import inside, uid_file_name

log = logging.getLogger("vesalius.store")

# Columns added to the tables of a SQLite database made before numbered migrations
# (node/migrations/): adopting one adds those it lacks. A new column is a new migration file.
ADDED_COLUMNS = (
    ("jobs", "result_key", "TEXT"),  # NULL: results per series; 'study/<uid>/<rule>' per study+rule
    ("jobs", "progress", "TEXT"),  # JSON {stage, n, of, started_at}: the stage a running job is in
    # ended associations that sent instances of the series, and whether the last one ended in a
    # normal release while no other association was sending it (node/series.py, quiet period)
    ("series", "associations", "INTEGER NOT NULL DEFAULT 0"),
    ("series", "released_normally", "INTEGER NOT NULL DEFAULT 0"),
    # leases (issue 17): the node holding a job's or a delivery's claim now, and until when (time.time()
    # of the holder's clock); both NULL when no claim is held. The holder renews it (node.leases)
    ("jobs", "lease_owner", "TEXT"),
    ("jobs", "lease_expires", "DOUBLE PRECISION"),
    ("deliveries", "lease_owner", "TEXT"),
    ("deliveries", "lease_expires", "DOUBLE PRECISION"),
)


def adopt_earlier_sqlite(db: Connection) -> None:
    """Before migration 1 on SQLite: a database of a version before numbered migrations gets the
    columns its tables lack (migration 1 then creates only the tables it lacks), and, when it
    predates study-level rules, its processed studies are recorded as selected (not redone)."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "jobs" not in tables:
        return  # a new database
    for table, column, kind in ADDED_COLUMNS:
        if table in tables and column not in {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    if "studies" not in tables:
        db.execute("CREATE TABLE studies (study_instance_uid TEXT PRIMARY KEY, selected_at REAL NOT NULL)")
        db.execute("INSERT INTO studies SELECT study_instance_uid, MAX(completed_at) FROM series "
                   "WHERE state='complete' GROUP BY study_instance_uid")


# A complete series that no job came of once its study was selected is only stored: the listing
# says 'stored' with the reason (the database keeps 'complete': study completion counts on it).
# A study rule's preference skip ends in routing.RANKED_LOWER; any other skip is a rule not matching.
_UNPROCESSED = ("s.state='complete' AND NOT EXISTS (SELECT 1 FROM jobs j WHERE "
                "j.series_instance_uid=s.series_instance_uid) AND EXISTS (SELECT 1 FROM studies st WHERE "
                "st.study_instance_uid=s.study_instance_uid AND st.selected_at >= s.completed_at)")
_NOT_CHOSEN = ("EXISTS (SELECT 1 FROM selections x WHERE x.series_instance_uid=s.series_instance_uid "
               "AND x.reason LIKE '%ranks higher on%')")
SERIES_STATE = (f"CASE WHEN {_UNPROCESSED} THEN 'stored' ELSE s.state END AS state, "
                f"CASE WHEN {_UNPROCESSED} THEN CASE WHEN {_NOT_CHOSEN} THEN 'not chosen: another series "
                "of the study ranks higher' ELSE 'no rule matches' END END AS reason")


def listings(d: Dialect) -> dict[str, str]:
    """The SQL of each listing in a dialect (they differ in how the JSON columns are built: a job's
    latest evaluation and correction, a study's selection reasons; each comes back as JSON text)."""
    correction = d.json_object("'series_instance_uid'", "c.series_instance_uid", "'verdict'", "c.verdict",
                               "'model_version'", "c.model_version", "'structures'",
                               d.json_column("c.structures"))
    latest_correction = d.as_text(
        f"(SELECT {correction} FROM corrections c WHERE c.state='recognised' AND c.job_id=jobs.id AND "
        "c.recognised_at=(SELECT MAX(y.recognised_at) FROM corrections y "
        "WHERE y.state='recognised' AND y.job_id=jobs.id))")
    # (no ORDER BY inside: Store.listing puts a study's WHERE before the listing's first ORDER BY)
    evaluation = d.json_object("'id'", "e.id", "'reference'", "e.reference", "'evaluated_at'",
                               "e.evaluated_at", "'figures'", d.json_column("e.figures"))
    latest_evaluation = d.as_text(
        f"(SELECT {evaluation} FROM evaluations e WHERE e.id=(SELECT MAX(x.id) FROM evaluations x "
        "WHERE x.job_id=jobs.id))")
    reasons = d.json_object("'rule'", "rule", "'series_instance_uid'", "series_instance_uid", "'decision'",
                            "decision", "'reason'", "reason")
    selection = d.as_text(f"(SELECT {d.json_array(reasons)} FROM selections x "
                          "WHERE x.study_instance_uid=st.study_instance_uid)")
    return {
        "series": "SELECT series_instance_uid, study_instance_uid, modality, series_description, calling_ae, "
                  f"{SERIES_STATE}, (SELECT COUNT(*) FROM instances i WHERE "
                  "i.series_instance_uid=s.series_instance_uid) AS instances, last_received, completed_at "
                  "FROM series s ORDER BY last_received DESC LIMIT ?",
        "jobs": "SELECT id, series_instance_uid, rule, model, destinations, state, attempts, error, stages, "
                "created_at, updated_at, result_key, progress, (SELECT s.study_instance_uid FROM series s "
                "WHERE s.series_instance_uid=jobs.series_instance_uid) AS study_instance_uid, (SELECT "
                "s.calling_ae FROM series s WHERE s.series_instance_uid=jobs.series_instance_uid) "
                "AS calling_ae, "
                f"{latest_evaluation} AS evaluation, {latest_correction} AS correction "
                "FROM jobs ORDER BY id DESC LIMIT ?",
        "deliveries": "SELECT id, job_id, destination, part, state, attempts, error, next_try_at, updated_at "
                      "FROM deliveries ORDER BY id DESC LIMIT ?",
        "studies": "SELECT st.study_instance_uid, st.selected_at, "
                   "(SELECT COUNT(*) FROM series s WHERE s.study_instance_uid=st.study_instance_uid) "
                   "AS series, "
                   f"{selection} AS selection "
                   "FROM studies st ORDER BY st.selected_at DESC LIMIT ?",
    }


LISTINGS = listings(database.SQLITE)
STUDY_FILTERS = {  # LISTINGS restricted to one study (the listings have no WHERE of their own)
    "series": "s.study_instance_uid=?",
    "jobs": "series_instance_uid IN (SELECT series_instance_uid FROM series WHERE study_instance_uid=?)",
    "deliveries": "job_id IN (SELECT j.id FROM jobs j JOIN series s ON s.series_instance_uid="
                  "j.series_instance_uid WHERE s.study_instance_uid=?)",
    "studies": "st.study_instance_uid=?",
}
# The listings' filters (each one SQL condition with one parameter); ``before`` is the keyset cursor:
# the id (jobs, deliveries) or time (series, studies) of the last row of the previous page.
_BY_AE = "SELECT series_instance_uid FROM series WHERE calling_ae=?"
LISTING_FILTERS: dict[str, dict[str, str]] = {
    "series": {"state": f"(CASE WHEN {_UNPROCESSED} THEN 'stored' ELSE s.state END)=?",
               "ae": "s.calling_ae=?", "since": "s.last_received>=?", "until": "s.last_received<?",
               "before": "s.last_received<?"},
    "jobs": {"state": "state=?", "ae": f"series_instance_uid IN ({_BY_AE})", "since": "created_at>=?",
             "until": "created_at<?", "before": "id<?"},
    "deliveries": {"job": "job_id=?", "state": "state=?",
                   "ae": f"job_id IN (SELECT j.id FROM jobs j WHERE j.series_instance_uid IN ({_BY_AE}))",
                   "since": "updated_at>=?", "until": "updated_at<?", "before": "id<?"},
    "studies": {"ae": "EXISTS (SELECT 1 FROM series s WHERE s.study_instance_uid=st.study_instance_uid "
                "AND s.calling_ae=?)", "since": "st.selected_at>=?", "until": "st.selected_at<?",
                "before": "st.selected_at<?"},
}
JOB_STATES = ("queued", "running", "done", "failed")
DELIVERY_STATES = ("pending", "done", "failed")


@dataclass(frozen=True)
class SeriesInfo:
    """What the receiver learns of a series from its first instance."""

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    sop_class_uid: str
    series_description: str
    body_part: str
    manufacturer: str


def _subfolders(path: Path) -> list[Path]:
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:  # removed meanwhile (retention, another listener's)
        return []
    return sorted(Path(e.path) for e in entries
                  if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))


def fsync_dir(path: Path) -> None:
    """Make a folder's new or renamed entries durable (POSIX: a rename survives a crash once
    its folder is fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write bytes so that they survive a crash: temp file, fsync, rename, fsync the folder."""
    _make_dirs_durably(path.parent)
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave half-written files behind
        raise
    fsync_dir(path.parent)


def _make_dirs_durably(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each new one's entry fsynced in its parent
    (once per new series folder, not per instance)."""
    if folder.is_dir():  # the common case, every instance after a series' first: one stat
        return
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    for created in missing:
        fsync_dir(created.parent)


def move_durably(src: Path, path: Path) -> None:
    """Move a received file into place so that it survives a crash: fsync, rename (one
    filesystem: no copy), fsync the folder (POSIX makes the new name durable only then)."""
    _make_dirs_durably(path.parent)
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, path)
    fsync_dir(path.parent)


class Store:
    """The database (one connection per thread) plus the spool folder. ``url`` "" is SQLite in
    data_dir (WAL, synchronous=FULL); a ``postgresql://`` URL is a PostgreSQL several nodes share."""

    def __init__(self, data_dir: str | Path, url: str = "") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.spool_dir = self.data_dir / "spool"
        self.results_dir = self.data_dir / "results"
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / "vesalius.sqlite"  # SQLite's file (unused with PostgreSQL)
        self.url = url or str(self.db_path)
        self._local = threading.local()
        # spool_series_dir's answers: resolving a folder costs a stat per path component, per instance
        self._series_dirs: dict[tuple[str, str], Path] = {}
        db = self._connection()
        self.dialect: Dialect = db.dialect
        self.listings = listings(self.dialect)
        # claims (node.leases) skip rows another node is claiming; SQLite's BEGIN IMMEDIATE serialises
        self.lock_clause = " FOR UPDATE SKIP LOCKED" if self.dialect.name == "postgres" else ""
        adopt = {1: adopt_earlier_sqlite} if self.dialect.name == "sqlite" else {}
        applied = database.migrate(db, before=adopt)
        if applied:
            log.info("database %s: migrated to version %d", database.shown(self.url), applied[-1])

    def _connection(self) -> Connection:
        """This thread's connection; a lost one (the server restarted) is replaced."""
        db: Connection | None = getattr(self._local, "db", None)
        if db is not None and db.broken:
            self._drop()
            db = None
        if db is None:
            db = database.connect(self.url)
            self._local.db = db
        return db

    def _drop(self) -> None:
        db: Connection | None = getattr(self._local, "db", None)
        self._local.db = None
        if db is not None:
            try:
                db.close()
            except database.Error:
                pass

    def _begun(self) -> Connection:
        """A connection with a transaction begun: one stale after a server restart fails at BEGIN,
        with nothing done, and is replaced once."""
        db = self._connection()
        try:
            db.begin()
        except database.OperationalError:
            if not db.broken:
                raise
            self._drop()
            db = self._connection()
            db.begin()
        return db

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One atomic, durable unit of work (SQLite: BEGIN IMMEDIATE ... COMMIT; PostgreSQL:
        BEGIN ... COMMIT, read committed, synchronous_commit on)."""
        db = self._begun()
        try:
            yield db
        except BaseException:
            try:
                db.rollback()
            except database.Error:  # the connection is gone, and with it the transaction
                self._drop()
            raise
        try:
            db.commit()
        except database.Error:  # e.g. SQLite busy: the transaction must not stay open
            try:
                db.rollback()
            except database.Error:
                self._drop()
            raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Rows of one read; a read on a connection lost to a server restart is tried once more."""
        db = self._connection()
        try:
            return db.execute(sql, params).fetchall()
        except database.OperationalError:
            if not db.broken:
                raise
            self._drop()
            return self._connection().execute(sql, params).fetchall()

    # --- instances -----------------------------------------------------------------------------

    def spool_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where an instance is kept: named from its UIDs through ``uid_file_name`` (a hash for
        irregular ones) and checked to stay in the spool. Rows keep their own path, so spools
        written by earlier versions stay readable."""
        return inside(self.spool_series_dir(study_uid, series_uid), f"{uid_file_name(sop_uid)}.dcm")

    def spool_series_dir(self, study_uid: str, series_uid: str) -> Path:
        """The spool folder of one series (named as in ``spool_path``), resolved and checked once
        per series (a folder retention removed is the same path when it comes back)."""
        key = (study_uid, series_uid)
        folder = self._series_dirs.get(key)
        if folder is None:
            folder = inside(self.spool_dir, uid_file_name(study_uid), uid_file_name(series_uid))
            if len(self._series_dirs) >= 1024:
                self._series_dirs.clear()
            self._series_dirs[key] = folder
        return folder

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """``spool_path`` for writing, without resolving the whole path again per instance: the
        series folder is resolved and checked (``spool_series_dir``), a UID's file name is one
        plain name (``uid_file_name``), and ``os.replace`` replaces a link there, never follows it."""
        return self.spool_series_dir(study_uid, series_uid) / f"{uid_file_name(sop_uid)}.dcm"

    @property
    def incoming_dir(self) -> Path:
        """Data sets being received (pynetdicom writes them here in chunks), on the spool's
        filesystem so that storing one is a rename."""
        return self.spool_dir / ".incoming"

    def store_instance(self, info: SeriesInfo, sop_instance_uid: str, data: bytes | Path,
                       calling_ae: str) -> bool:
        """Write the file (bytes, or a received file moved into place) durably and record it;
        False when this SOP Instance UID was already stored.

        On SQLite the fsynced spool file is the record: the row is committed without its own fsync of the
        WAL (synchronous=NORMAL; consistent, and made durable by the next FULL commit of anything)
        and node.spool_recovery rebuilds rows a power loss took at the next start. Only a new
        series' first row is committed FULL, so its calling AE is never lost."""
        path = self.instance_path(info.study_instance_uid, info.series_instance_uid, sop_instance_uid)
        if isinstance(data, Path):
            move_durably(data, path)
        else:
            write_durably(path, data)
        now = time.time()
        db = self._connection()
        if db.dialect.name != "sqlite":
            # PostgreSQL commits durably: its server can crash and restart under running listeners,
            # which rebuild rows from the spool only when they start themselves
            return self._record_instance(info, sop_instance_uid, path, calling_ae, now)
        new_series = db.execute("SELECT 1 FROM series WHERE series_instance_uid=?",
                                (info.series_instance_uid,)).fetchone() is None
        db.execute(f"PRAGMA synchronous={'FULL' if new_series else 'NORMAL'}")
        try:
            return self._record_instance(info, sop_instance_uid, path, calling_ae, now)
        finally:
            db.execute("PRAGMA synchronous=FULL")

    def _record_instance(self, info: SeriesInfo, sop_instance_uid: str, path: Path, calling_ae: str,
                         now: float) -> bool:
        with self.transaction() as db:
            known = db.execute("SELECT 1 FROM instances WHERE sop_instance_uid=?",
                               (sop_instance_uid,)).fetchone()
            db.execute(
                "INSERT INTO instances VALUES (?,?,?,?,?,?) ON CONFLICT (sop_instance_uid) DO UPDATE SET "
                "series_instance_uid=excluded.series_instance_uid, sop_class_uid=excluded.sop_class_uid, "
                "path=excluded.path, calling_ae=excluded.calling_ae, received_at=excluded.received_at",
                (sop_instance_uid, info.series_instance_uid, info.sop_class_uid, str(path), calling_ae, now),
            )
            db.execute(
                """INSERT INTO series (series_instance_uid, study_instance_uid, modality, sop_class_uid,
                       series_description, body_part, manufacturer, calling_ae, first_received, last_received)
                   VALUES (?,?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(series_instance_uid) DO UPDATE SET
                       last_received=excluded.last_received, released_at=NULL,
                       state=CASE WHEN series.state='complete' THEN 'receiving' ELSE series.state END""",
                (info.series_instance_uid, info.study_instance_uid, info.modality, info.sop_class_uid,
                 info.series_description, info.body_part, info.manufacturer, calling_ae, now, now),
            )
        return known is None

    def mark_released(self, series_uids: Sequence[str], normally: Sequence[str] = ()) -> None:
        """The association that sent these series has ended: start their quiet period.
        ``normally``: those of them it ended with a normal A-RELEASE, no other association sending."""
        if not series_uids:
            return
        with self.transaction() as db:
            _mark_released(db, series_uids, normally)

    # --- associations open at any listener sharing this database (issue 17) ------------------------

    def open_association(self, node: str, association: str, series_uid: str) -> None:
        """An association at listener ``node`` stores its first instance of this series."""
        with self.transaction() as db:
            db.execute("INSERT INTO open_associations VALUES (?,?,?,?) ON CONFLICT (node_name, association, "
                       "series_instance_uid) DO UPDATE SET last_seen=excluded.last_seen",
                       (node, association, series_uid, time.time()))

    def close_association(self, node: str, association: str, series_uids: Sequence[str], released: bool,
                          lease_seconds: float) -> list[str]:
        """The association ended: its series start their quiet period, in one transaction with
        forgetting it. Returns those it ended with a normal release while no other association,
        at any listener, was storing them (renewed within ``lease_seconds``: a dead listener's
        rows do not count)."""
        now = time.time()
        with self.transaction() as db:
            db.execute("DELETE FROM open_associations WHERE node_name=? AND association=?",
                       (node, association))
            normally = [uid for uid in series_uids if released and db.execute(
                "SELECT 1 FROM open_associations WHERE series_instance_uid=? AND last_seen>=?",
                (uid, now - lease_seconds)).fetchone() is None]
            if series_uids:
                _mark_released(db, series_uids, normally)
        return normally

    def series_folders(self) -> list[Path]:
        """Every series folder in the spool (spool/<study>/<series>), in name order; never a dot
        name (``.incoming``) or a link."""
        return [series for study in _subfolders(self.spool_dir) for series in _subfolders(study)]

    def series_paths(self, series_uid: str) -> list[Path]:
        rows = self.query("SELECT path FROM instances WHERE series_instance_uid=? ORDER BY path",
                          (series_uid,))
        return [Path(r["path"]) for r in rows]

    # --- jobs ------------------------------------------------------------------------------------

    def add_job(self, db: Connection, series_uid: str, rule: str, model: str,
                destinations: Sequence[str], result_key: str | None = None) -> int:
        """Queue a job; ``result_key`` (a study rule's) names the result set it replaces."""
        now = time.time()
        return db.insert(
            "INSERT INTO jobs (series_instance_uid, rule, model, destinations, created_at, updated_at, "
            "result_key) VALUES (?,?,?,?,?,?,?)",
            (series_uid, rule, model, json.dumps(list(destinations)), now, now, result_key))

    # A claim is a lease: the claimer's name and an expiry it renews (node.leases). Claims are taken
    # with lock_clause: " FOR UPDATE SKIP LOCKED" on PostgreSQL, so concurrent claimers skip each
    # other's rows; "" on SQLite, where BEGIN IMMEDIATE serialises the claimers (set in __init__).

    def claim_job(self, owner: str = "", lease_seconds: float = 30.0,
                  max_attempts: int = 0) -> Row | None:
        """Take the oldest queued job, or a running one whose lease expired (its node died), and mark
        it running under ``owner``'s lease (one attempt more). An expired one that had
        ``max_attempts`` attempts already fails instead (0: no limit): a job that kills every node
        running it is not retried forever."""
        now = time.time()
        with self.transaction() as db:
            while True:
                row = db.execute("SELECT id, state, attempts, lease_owner FROM jobs WHERE state='queued' "
                                 "OR (state='running' AND lease_expires<?) ORDER BY id LIMIT 1"
                                 + self.lock_clause, (now,)).fetchone()
                if row is None:
                    return None
                lost = None if row["state"] == "queued" else (
                    f"attempt {row['attempts']} on node {row['lease_owner']} ended without a result: its "
                    "lease expired (the node died, hung or lost the database)")
                if lost is None or not max_attempts or row["attempts"] < max_attempts:
                    break
                db.execute("UPDATE jobs SET state='failed', error=?, lease_owner=NULL, lease_expires=NULL, "
                           "updated_at=? WHERE id=?", (lost, now, row["id"]))
            db.execute("UPDATE jobs SET state='running', attempts=attempts+1, progress=NULL, lease_owner=?, "
                       "lease_expires=?, error=COALESCE(?, error), updated_at=? WHERE id=?",
                       (owner, now + lease_seconds, lost, now, row["id"]))
            claimed: Row | None = db.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone()
            return claimed

    def finish_job(self, job_id: int, result_dir: Path, stages: dict[str, float],
                   destinations: Sequence[str], claim: Claim | None = None) -> bool:
        """The job's results are files: mark it done and queue one delivery per destination.
        With ``claim``, only if the job is still running under that claim (fencing: a node whose
        lease expired and was taken over records nothing); False when refused."""
        now = time.time()
        fence, held = _fence(claim, "state='running' AND ")
        with self.transaction() as db:
            if db.execute("UPDATE jobs SET state='done', error=NULL, result_dir=?, stages=?, "
                          "lease_owner=NULL, lease_expires=NULL, updated_at=? WHERE id=?" + fence,
                          (str(result_dir), json.dumps(stages), now, job_id, *held)).rowcount != 1:
                return False
            # a re-run job delivers its (replacing) results again; a send in flight loses its claim;
            # a destination that has the first objects (results_ready) gets the rest, else all; one
            # whose first objects are being sent right now is left to that send (record_delivery
            # queues the rest when it is done): reset to 'all', they would go out twice
            _queue_deliveries(db, job_id, destinations, now, part_on_conflict=(
                "CASE WHEN deliveries.part='first' AND deliveries.state='done' THEN 'rest' ELSE 'all' END"),
                unless="deliveries.part='first' AND deliveries.state='pending' "
                       "AND COALESCE(deliveries.lease_expires, 0) >= excluded.updated_at")  # a live send
        return True

    def fail_job(self, job_id: int, error: str, *, retry: bool, claim: Claim | None = None) -> bool:
        """Queue the job again (``retry``) or mark it failed; with ``claim``, fenced as finish_job."""
        state = "queued" if retry else "failed"
        fence, held = _fence(claim, "state='running' AND ")
        with self.transaction() as db:
            return db.execute("UPDATE jobs SET state=?, error=?, lease_owner=NULL, lease_expires=NULL, "
                              "updated_at=? WHERE id=?" + fence,
                              (state, error, time.time(), job_id, *held)).rowcount == 1

    def requeue_interrupted_jobs(self, owner: str = "") -> int:
        """At this node's start or stop: the jobs it was running go back to the queue and the
        deliveries it was sending are free again. Other nodes' claims are left to their leases;
        running jobs without an owner were left by a version before leases."""
        with self.transaction() as db:
            db.execute("UPDATE deliveries SET lease_owner=NULL, lease_expires=NULL WHERE lease_owner=?",
                       (owner,))
            return db.execute("UPDATE jobs SET state='queued', lease_owner=NULL, lease_expires=NULL, "
                              "updated_at=? WHERE state='running' AND (lease_owner=? OR lease_owner IS NULL)",
                              (time.time(), owner)).rowcount

    def renew_leases(self, owner: str, lease_seconds: float, jobs: Mapping[int, int],
                     deliveries: Mapping[int, int]) -> list[str]:
        """The heartbeat: extend this node's claims ({row id: attempt}), its open associations
        and its own liveness by ``lease_seconds``; forget associations whose listener stopped
        renewing them. Returns the claims found taken over ("jobs 3")."""
        now = time.time()
        lost = []
        with self.transaction() as db:
            for table, held in (("jobs", jobs), ("deliveries", deliveries)):
                state = "state='running' AND " if table == "jobs" else ""
                for row_id, attempt in held.items():
                    renewed = db.execute(f"UPDATE {table} SET lease_expires=? WHERE id=? AND {state}"
                                         "lease_owner=? AND attempts=?",
                                         (now + lease_seconds, row_id, owner, attempt)).rowcount
                    if renewed != 1:
                        lost.append(f"{table} {row_id}")
            db.execute("UPDATE open_associations SET last_seen=? WHERE node_name=?", (now, owner))
            db.execute("DELETE FROM open_associations WHERE last_seen<?", (now - 2 * lease_seconds,))
            db.execute("UPDATE nodes SET last_seen=? WHERE node_name=?", (now, owner))
        return lost

    def register_node(self, name: str, lease_seconds: float) -> dict[str, Any] | None:
        """Record this process as node ``name`` and forget the associations an earlier run of it
        left open; unless another live node has that name: then return that node's row (host, pid,
        last_seen) and change nothing. An earlier run of this node on this host (its pid ended, or
        it is ours: a container's pid 1) is not another node."""
        host, pid, now = socket.gethostname(), os.getpid(), time.time()
        with self.transaction() as db:
            row = db.execute("SELECT host, pid, last_seen FROM nodes WHERE node_name=?", (name,)).fetchone()
            if (row is not None and row["last_seen"] >= now - lease_seconds
                    and not (row["host"] == host and (row["pid"] == pid or not _process_alive(row["pid"])))):
                return dict(row)
            db.execute("INSERT INTO nodes VALUES (?,?,?,?,?) ON CONFLICT (node_name) DO UPDATE SET "
                       "host=excluded.host, pid=excluded.pid, started_at=excluded.started_at, "
                       "last_seen=excluded.last_seen", (name, host, pid, now, now))
            db.execute("DELETE FROM open_associations WHERE node_name=?", (name,))
        return None

    def unregister_node(self, name: str) -> None:
        """This node stops: it is no longer alive, and has no association open."""
        with self.transaction() as db:
            db.execute("DELETE FROM open_associations WHERE node_name=?", (name,))
            db.execute("DELETE FROM nodes WHERE node_name=?", (name,))

    def take_duties(self, owner: str, names: Iterable[str], lease_seconds: float) -> set[str]:
        """Take or renew background duties: ``owner`` holds a duty afterwards if nobody held it, it
        held it already, or the holder's lease expired (one atomic upsert each, in one
        transaction). Returns the duties ``owner`` holds now."""
        now = time.time()
        held = set()
        with self.transaction() as db:
            for name in names:
                db.execute("INSERT INTO duties (name, owner, expires) VALUES (?,?,?) ON CONFLICT (name) "
                           "DO UPDATE SET owner=excluded.owner, expires=excluded.expires "
                           "WHERE duties.owner=excluded.owner OR duties.expires<?",
                           (name, owner, now + lease_seconds, now))
                if db.execute("SELECT owner FROM duties WHERE name=?", (name,)).fetchone()[0] == owner:
                    held.add(name)
        return held

    def release_duties(self, owner: str) -> None:
        """A node stopping cleanly gives its duties up, so another takes them at its next beat."""
        with self.transaction() as db:
            db.execute("DELETE FROM duties WHERE owner=?", (owner,))

    def job(self, job_id: int) -> Row | None:
        rows = self.query("SELECT * FROM jobs WHERE id=?", (job_id,))
        return rows[0] if rows else None

    # --- deliveries ------------------------------------------------------------------------------

    def due_deliveries(self) -> list[Row]:
        return self.query(
            "SELECT d.*, j.result_dir FROM deliveries d JOIN jobs j ON j.id=d.job_id "
            "WHERE d.state='pending' AND d.next_try_at<=? ORDER BY d.next_try_at", (time.time(),))

    def delivery_due(self) -> bool:
        """Whether claim_delivery would find a delivery: a read, taking no write lock."""
        now = time.time()
        return self.query("SELECT 1 FROM deliveries WHERE state='pending' AND next_try_at<=? AND "
                          "(lease_expires IS NULL OR lease_expires<?) LIMIT 1", (now, now)) != []

    def claim_delivery(self, owner: str = "", lease_seconds: float = 30.0) -> Row | None:
        """Take the delivery due longest that no live node is sending, under ``owner``'s lease,
        with its job's result_dir. A lease that expired (its sender died mid-send) counts as a
        failed try, so the destination's max_attempts ends a delivery that kills its senders."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT id, lease_owner FROM deliveries WHERE state='pending' AND "
                             "next_try_at<=? AND (lease_expires IS NULL OR lease_expires<?) "
                             "ORDER BY next_try_at LIMIT 1"
                             + self.lock_clause, (now, now)).fetchone()
            if row is None:
                return None
            if row["lease_owner"] is not None:
                db.execute("UPDATE deliveries SET attempts=attempts+1, error=? WHERE id=?",
                           (f"the try of node {row['lease_owner']} ended without an answer: its lease "
                            "expired (the node died, hung or lost the database)", row["id"]))
            db.execute("UPDATE deliveries SET lease_owner=?, lease_expires=? WHERE id=?",
                       (owner, now + lease_seconds, row["id"]))
            claimed: Row | None = db.execute(
                "SELECT d.*, j.result_dir FROM deliveries d JOIN jobs j ON j.id=d.job_id WHERE d.id=?",
                (row["id"],)).fetchone()
            return claimed

    def record_delivery(self, delivery_id: int, state: str, error: str | None, next_try_at: float,
                        claim: Claim | None = None) -> bool:
        """One try's outcome; with ``claim`` only if the delivery is still under that claim (not
        taken over after its lease expired, nor reset by a re-run of its job); False when refused."""
        fence, held = _fence(claim)
        now = time.time()
        with self.transaction() as db:
            if db.execute("UPDATE deliveries SET state=?, error=?, attempts=attempts+1, next_try_at=?, "
                          "lease_owner=NULL, lease_expires=NULL, updated_at=? WHERE id=?" + fence,
                          (state, error, next_try_at, now, delivery_id, *held)).rowcount != 1:
                return False
            # the first objects went out after their job ended (finish_job left them to this send)
            db.execute("UPDATE deliveries SET state='pending', part='rest', attempts=0, next_try_at=?, "
                       "updated_at=? WHERE id=? AND state='done' AND part='first' AND "
                       "(SELECT j.state FROM jobs j WHERE j.id=deliveries.job_id)='done'",
                       (now, now, delivery_id))
            return True

    # --- operator actions ------------------------------------------------------------------------

    def retry_job(self, job_id: int) -> bool:
        """Queue a failed (or finished) job again with fresh attempts; False if no such job."""
        with self.transaction() as db:
            changed = db.execute("UPDATE jobs SET state='queued', attempts=0, error=NULL, updated_at=? "
                                 "WHERE id=? AND state IN ('failed', 'done')", (time.time(), job_id))
            return changed.rowcount == 1

    def resend_job(self, job_id: int) -> int:
        """Send a finished job's results to its destinations again; returns the deliveries reset."""
        with self.transaction() as db:
            return db.execute("UPDATE deliveries SET state='pending', part='all', attempts=0, error=NULL, "
                              "next_try_at=?, lease_owner=NULL, lease_expires=NULL, updated_at=? "
                              "WHERE job_id=?", (time.time(), time.time(), job_id)).rowcount

    def bump(self, db: Connection, counter: str, by: int = 1) -> None:
        """Add to a monotonic counter, inside the caller's transaction."""
        db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
                   "value=counters.value+excluded.value", (counter, by))

    def counter(self, name: str) -> int:
        rows = self.query("SELECT value FROM counters WHERE name=?", (name,))
        return int(rows[0]["value"]) if rows else 0

    # --- study-level selection (issue 18) ---------------------------------------------------------

    def save_facts(self, db: Connection, series_uid: str, facts: dict[str, Any]) -> None:
        db.execute("INSERT INTO series_facts VALUES (?,?,?) ON CONFLICT (series_instance_uid) DO UPDATE SET "
                   "facts=excluded.facts, read_at=excluded.read_at",
                   (series_uid, json.dumps(facts), time.time()))

    def facts(self, db: Connection, series_uid: str) -> dict[str, Any] | None:
        row = db.execute("SELECT facts FROM series_facts WHERE series_instance_uid=?",
                         (series_uid,)).fetchone()
        return None if row is None else dict(json.loads(row["facts"]))

    def record_selection(self, db: Connection, study_uid: str, rule: str,
                         decisions: Sequence[tuple[str, str, str]], now: float) -> None:
        """Replace a rule's reasons for a study: (series UID, chosen|skipped, reason) each."""
        db.execute("DELETE FROM selections WHERE study_instance_uid=? AND rule=?", (study_uid, rule))
        db.executemany("INSERT INTO selections VALUES (?,?,?,?,?,?)",
                       [(study_uid, rule, uid, decision, reason, now) for uid, decision, reason in decisions])

    def selections(self, study_uid: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self.query(
            "SELECT rule, series_instance_uid, decision, reason, decided_at FROM selections "
            "WHERE study_instance_uid=? ORDER BY rule, decision, series_instance_uid", (study_uid,))]

    # --- reporting -------------------------------------------------------------------------------

    def listing(self, what: str, limit: int = 500, study: str | None = None,
                **filters: str | float | None) -> list[dict[str, Any]]:
        """The newest rows of 'series', 'jobs', 'deliveries' or 'studies' (with each study's
        selection reasons as a JSON list), for the API and `vesalius status`;
        ``study`` keeps only the rows of that Study Instance UID, ``filters`` (LISTING_FILTERS:
        state, ae, since, until, before) narrow further; None means no filter."""
        sql, params = self.listing_sql(what, limit, study=study, listings=self.listings, **filters)
        rows = [dict(r) for r in self.query(sql, params)]
        for row in rows:
            if "selection" in row:  # the JSON list the database built, as a list
                row["selection"] = sorted(json.loads(row["selection"]),
                                          key=lambda d: (d["rule"], d["decision"], d["series_instance_uid"]))
        return rows

    @staticmethod
    def listing_sql(what: str, limit: int, study: str | None = None, listings: dict[str, str] = LISTINGS,
                    **filters: str | float | None) -> tuple[str, list[Any]]:
        """The SQL and parameters of one listing page (the listings have no WHERE of their own);
        ``listings``: those of the store's dialect (Store.listings), SQLite's by default."""
        conditions: list[str] = []
        params: list[Any] = []
        if study is not None:
            conditions.append(STUDY_FILTERS[what])
            params.append(study)
        for name, value in filters.items():
            if value is None:
                continue
            if name not in LISTING_FILTERS[what]:
                raise ValueError(f"{what} cannot be filtered by {name}")
            conditions.append(LISTING_FILTERS[what][name])
            params.append(value)
        sql = listings[what]
        if conditions:
            sql = sql.replace(" ORDER BY", f" WHERE {' AND '.join(conditions)} ORDER BY", 1)
        return sql, [*params, limit]

    def counts(self, table: str, states: Sequence[str]) -> dict[str, int]:
        if table not in ("jobs", "deliveries", "series"):  # a table name cannot be an SQL parameter
            raise ValueError(f"no state counts for table {table!r}")
        found = {r["state"]: r["n"] for r in self.query(
            f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")}
        return {s: int(found.get(s, 0)) for s in states}


class Claim(NamedTuple):
    """Who holds a job's or a delivery's lease, and the row's attempts when it was claimed: the
    fencing token finish_job, fail_job and record_delivery check."""

    owner: str
    attempt: int

    @staticmethod
    def of(row: Row) -> Claim | None:
        """The claim a row from claim_job or claim_delivery carries (None: a row not claimed)."""
        return None if row["lease_owner"] is None else Claim(str(row["lease_owner"]), int(row["attempts"]))


def _fence(claim: Claim | None, also: str = "") -> tuple[str, tuple[Any, ...]]:
    """The WHERE condition (to append) and parameters that keep an update to the holder of ``claim``."""
    if claim is None:
        return "", ()
    return f" AND {also}lease_owner=? AND attempts=?", (claim.owner, claim.attempt)


def _mark_released(db: Connection, series_uids: Sequence[str], normally: Sequence[str]) -> None:
    clean = set(normally)
    db.executemany(
        "UPDATE series SET released_at=?, released_normally=?, associations=associations+1 "
        "WHERE series_instance_uid=? AND state='receiving'",
        [(time.time(), int(uid in clean), uid) for uid in series_uids])


def _process_alive(pid: int) -> bool:
    """Whether a process of this host runs (a zombie, ended but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def existing_store(data_dir: str | Path, url: str = "") -> Store:
    """The node's store for a command (status, retry, pull, ...): with SQLite, never a new empty
    database made by mistake in the wrong folder."""
    from vesalius.node.checks import ConfigError

    if not url and not (Path(data_dir) / "vesalius.sqlite").exists():
        raise ConfigError(f"--data-dir: no Vesalius database in {data_dir}")
    return Store(data_dir, url)


def results_ready(locator: str | Path, job_id: int, claim: Claim | None, result_dir: str | Path,
                  destinations: Sequence[str]) -> bool:
    """A worker says a running job's results folder holds its first objects (the SEG, SR and
    Surface Segmentation; node.pipeline.OnResults): their deliveries start while it writes the 3D
    preview and the STLs, and finish_job queues those as the deliveries' 'rest'. Its own short
    connection, as record_progress; fenced by the job's claim; False when refused."""
    now = time.time()
    fence, held = _fence(claim)
    db = database.connect(locator)
    try:
        with db.transaction():
            if db.execute("UPDATE jobs SET result_dir=?, updated_at=? WHERE id=? AND state='running'" + fence,
                          (str(result_dir), now, job_id, *held)).rowcount != 1:
                return False
            _queue_deliveries(db, job_id, destinations, now, part="first")
        return True
    finally:
        db.close()


def _queue_deliveries(db: Connection, job_id: int, destinations: Sequence[str], now: float,
                      part: str = "all", part_on_conflict: str = "excluded.part", unless: str = "") -> None:
    """One pending delivery of ``part`` per destination; an existing one is reset (its attempts,
    its lease: a send in flight loses its claim) to ``part_on_conflict`` (an SQL expression; by
    default ``part`` too), except where ``unless`` (an SQL condition on the existing row) holds:
    in the upsert itself, so it is judged on the row as it is when the update takes its lock."""
    db.executemany(
        "INSERT INTO deliveries (job_id, destination, next_try_at, updated_at, part) VALUES (?,?,?,?,?) "
        f"ON CONFLICT(job_id, destination) DO UPDATE SET part={part_on_conflict}, state='pending', "
        "attempts=0, error=NULL, next_try_at=excluded.next_try_at, lease_owner=NULL, lease_expires=NULL, "
        "updated_at=excluded.updated_at" + (f" WHERE NOT ({unless})" if unless else ""),
        [(job_id, d, now, now, part) for d in destinations])


def record_progress(locator: str | Path, job_id: int, stage: str, n: int, of: int) -> None:
    """A worker process says which stage a running job has started (its own short connection to
    the store's ``url``, a SQLite path or a PostgreSQL URL: the worker holds no Store); the
    dashboard and /jobs read it while the job runs."""
    progress = json.dumps({"stage": stage, "n": n, "of": of, "started_at": time.time()})
    db = database.connect(locator)
    try:
        db.execute("UPDATE jobs SET progress=? WHERE id=? AND state='running'", (progress, job_id))
    finally:
        db.close()


# --- retention and de-identification (issue 9) ------------------------------------------

class DeidMapping:
    """The pseudonym table seen through one open transaction (node.deidentify.Mapping)."""

    def __init__(self, db: Connection) -> None:
        self.db = db

    def pseudonym(self, kind: str, original: str, new: Any) -> str:
        """The pseudonym of ``original``; a first sighting records ``new()``."""
        row = self.db.execute("SELECT pseudonym FROM deid_map WHERE kind=? AND original=?",
                              (kind, original)).fetchone()
        if row is not None:
            return str(row[0])
        # a transaction recording the same original meanwhile (PostgreSQL, read committed) wins
        self.db.execute("INSERT INTO deid_map VALUES (?,?,?,?) ON CONFLICT (kind, original) DO NOTHING",
                        (kind, original, str(new()), time.time()))
        return str(self.db.execute("SELECT pseudonym FROM deid_map WHERE kind=? AND original=?",
                                   (kind, original)).fetchone()[0])

    def original(self, kind: str, pseudonym: str) -> str | None:
        row = self.db.execute("SELECT original FROM deid_map WHERE kind=? AND pseudonym=?",
                              (kind, pseudonym)).fetchone()
        return None if row is None else str(row[0])


@contextmanager
def deid_mapping(store: Store) -> Iterator[DeidMapping]:
    """All the pseudonyms of one delivery in one transaction (a crash records none of them)."""
    with store.transaction() as db:
        yield DeidMapping(db)


def removal_of_results(store: Store, job_id: int) -> Row | None:
    """Why a job has no results any more (retention removed them), or None."""
    rows = store.query("SELECT * FROM removals WHERE kind='results' AND job_id=? "
                       "ORDER BY id DESC LIMIT 1", (job_id,))
    return rows[0] if rows else None


def removal_of_spool(store: Store, series_uid: str) -> Row | None:
    rows = store.query("SELECT * FROM removals WHERE kind='spool' AND series_instance_uid=? "
                       "ORDER BY id DESC LIMIT 1", (series_uid,))
    return rows[0] if rows else None
