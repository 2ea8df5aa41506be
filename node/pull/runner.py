"""The pull runner, a thread of the node: queries queued pull jobs, retrieves their studies at
each source's pace, and follows each study until its jobs have run.

Every step is a row first (node.store's pull tables), so a node that stops (or is killed) goes on
where it was: a series being retrieved is listed again at the source and only the instances the
spool lacks are fetched. Retrieved instances take the way pushed ones take (series and study
completion, routing, jobs, deliveries); a study being retrieved is not selected before it is
complete (node.series.DUE_STUDIES).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Protocol

from vesalius.node import database
from vesalius.node.config import Config
from vesalius.node.pull.dicomweb import DicomwebClient
from vesalius.node.pull.dimse import DimseClient, SourceError
from vesalius.node.pull.query import PullQuery, StudyMatch
from vesalius.node.sources import DicomwebSource, DimseSource, Source, in_window, parse_window
from vesalius.node.store import Store

log = logging.getLogger("vesalius.pull")


class Client(Protocol):
    whole_series: bool
    # C-MOVE: the instances come to the listener over the source's own associations, whose end the
    # listener records; C-GET and WADO-RS: the runner records the retrieval's end itself
    through_listener: bool

    def studies(self, query: PullQuery) -> list[StudyMatch]: ...
    def instances(self, study_uid: str, series_uid: str) -> list[str]: ...
    def retrieve(self, store: Store, study_uid: str, series_uid: str, sop_uids: list[str] | None,
                 min_free_bytes: int = 0) -> None: ...
    def close(self) -> None: ...


def client_for(source: Source, node_ae_title: str, max_instance_bytes: int = 0) -> Client:
    """The client of a source's kind; ``max_instance_bytes`` bounds one instance retrieved by C-GET
    or WADO-RS (C-MOVE's arrive through the listener, bounded by max_instance_mb already)."""
    if isinstance(source, DimseSource):
        return DimseClient(source, node_ae_title, max_instance_bytes)
    assert isinstance(source, DicomwebSource)
    return DicomwebClient(source, max_instance_bytes)


def matches(source: Source, query: PullQuery, node_ae_title: str) -> list[StudyMatch]:
    """What a query selects at a source, oldest study first (what a dry run lists and a job pulls)."""
    selected = [m for s in client_for(source, node_ae_title).studies(query) if (m := query.select(s))]
    selected.sort(key=lambda s: (s.study_date, s.study_uid))
    return selected[:query.limit] if query.limit else selected


class Pace:
    """A source's average rate in instances per second, shared by its retrievals: one that
    fetches n instances makes the next start n / rate seconds after it started."""

    def __init__(self, per_second: float) -> None:
        self.per_second = per_second
        self.next_at = 0.0
        self.lock = threading.Lock()

    def wait(self, instances: int, stopping: threading.Event) -> bool:
        """Wait for our turn; False when the node stops meanwhile."""
        if self.per_second <= 0:
            return not stopping.is_set()
        with self.lock:
            start = max(time.monotonic(), self.next_at)
            self.next_at = start + instances / self.per_second
        return not stopping.wait(max(0.0, start - time.monotonic()))


class PullRunner:
    def __init__(self, store: Store, config: Config, stopping: threading.Event,
                 clock: Callable[[], datetime] = datetime.now,
                 on_duty: Callable[[], bool] = lambda: True) -> None:
        self.store = store
        self.on_duty = on_duty  # whether this node does the pull duty now (node.leases: one node does)
        self.config = config
        self.stopping = stopping
        self.clock = clock  # local time of day, for the sources' windows
        self.sources = {s.name: s for s in config.sources}
        self.clients = {s.name: client_for(s, config.ae_title, config.max_instance_mb * 2**20)
                        for s in config.sources}
        self.paces = {s.name: Pace(s.instances_per_second) for s in config.sources}
        self.pools = {s.name: ThreadPoolExecutor(s.max_concurrent, thread_name_prefix=f"pull-{s.name}")
                      for s in config.sources}
        self.in_flight: dict[str, set[tuple[int, str]]] = {s.name: set() for s in config.sources}
        self.lock = threading.Lock()
        self.min_free_bytes = config.min_free_disk_mb * 2**20
        self.thread = threading.Thread(target=self._run, name="pull", daemon=True)

    def _run(self) -> None:
        while not self.stopping.wait(0.5):
            try:
                if self.on_duty():  # a node taking the duty over resumes running jobs as at start-up
                    self.tick()
            except database.Error as err:
                database.pause_after_outage("pull runner", err, self.stopping)
            except Exception:  # keep running; the next tick tries again
                log.exception("pull runner failed")

    def shutdown(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        for client in self.clients.values():
            client.close()
        self.thread.join(timeout=2)

    def tick(self) -> None:
        self._query_queued()
        self._dispatch()
        self._follow_processing()
        self._finish_jobs()

    # --- query --------------------------------------------------------------------------------

    def _query_queued(self) -> None:
        for job in self.store.query("SELECT * FROM pull_jobs WHERE state='queued' ORDER BY id"):
            source = self.sources.get(job["source"])
            if source is None:
                self._fail_job(job["id"], f"source {job['source']!r} is not configured")
                continue
            try:
                found = matches(source, PullQuery.from_json(job["query"]), self.config.ae_title)
            except SourceError as err:
                self._fail_job(job["id"], f"query failed: {err}")
                continue
            now = time.time()
            with self.store.transaction() as db:
                state = db.execute("SELECT state FROM pull_jobs WHERE id=?", (job["id"],)).fetchone()[0]
                if state != "queued":
                    continue  # paused or cancelled while the source answered
                for study in found:
                    modalities = "\\".join(sorted({s.modality for s in study.series if s.modality}))
                    db.execute("INSERT INTO pull_studies (job_id, study_instance_uid, study_date, "
                               "modalities, updated_at) VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                               (job["id"], study.study_uid, study.study_date, modalities, now))
                    db.executemany("INSERT INTO pull_series (job_id, study_instance_uid, "
                                   "series_instance_uid, modality, expected, updated_at) "
                                   "VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                                   [(job["id"], study.study_uid, s.series_uid, s.modality, s.instances, now)
                                    for s in study.series])
                db.execute("UPDATE pull_jobs SET state='running', updated_at=? WHERE id=?", (now, job["id"]))
            log.info("pull job %d: %d studies match at %s", job["id"], len(found), source.name)

    def _fail_job(self, job_id: int, error: str) -> None:
        log.warning("pull job %d failed: %s", job_id, error)
        with self.store.transaction() as db:
            db.execute("UPDATE pull_jobs SET state='failed', error=?, updated_at=? WHERE id=?",
                       (error, time.time(), job_id))

    # --- retrieval -----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        for name, source in self.sources.items():
            if not in_window(parse_window(source.window), self.clock().time()):
                continue
            with self.lock:
                busy = set(self.in_flight[name])
            free = source.max_concurrent - len(busy)
            if free <= 0:
                continue
            waiting = self.store.query(
                "SELECT p.job_id, p.study_instance_uid FROM pull_studies p JOIN pull_jobs j ON j.id=p.job_id "
                "WHERE j.source=? AND j.state='running' AND p.state IN ('queried', 'retrieving') "
                "ORDER BY p.job_id, p.study_date, p.study_instance_uid", (name,))
            for row in waiting:
                key = (row["job_id"], row["study_instance_uid"])
                if free <= 0:
                    break
                if key in busy:
                    continue
                with self.lock:
                    self.in_flight[name].add(key)
                free -= 1
                self.pools[name].submit(self._retrieve_study, name, *key)

    def _running(self, job_id: int) -> bool:
        rows = self.store.query("SELECT state FROM pull_jobs WHERE id=?", (job_id,))
        return bool(rows) and rows[0]["state"] == "running" and not self.stopping.is_set()

    def _set(self, table: str, job_id: int, uid: str, state: str, reason: str | None = None,
             **columns: object) -> None:
        key = "study_instance_uid" if table == "pull_studies" else "series_instance_uid"
        assignments = "".join(f", {c}=?" for c in columns)
        with self.store.transaction() as db:
            db.execute(f"UPDATE {table} SET state=?, reason=?, updated_at=?{assignments} "
                       f"WHERE job_id=? AND {key}=? AND state NOT IN ('cancelled')",
                       (state, reason, time.time(), *columns.values(), job_id, uid))

    def _retrieve_study(self, source_name: str, job_id: int, study_uid: str) -> None:
        try:
            if self._running(job_id):
                self._set("pull_studies", job_id, study_uid, "retrieving")
                self._retrieve_series_of(source_name, job_id, study_uid)
        except Exception as err:  # a bug must not leave the study 'retrieving' without a word
            log.exception("pull job %d: retrieval failed", job_id)
            self._set("pull_studies", job_id, study_uid, "failed", f"internal error: {type(err).__name__}")
        finally:
            with self.lock:
                self.in_flight[source_name].discard((job_id, study_uid))

    def _retrieve_series_of(self, source_name: str, job_id: int, study_uid: str) -> None:
        client = self.clients[source_name]
        series = self.store.query("SELECT series_instance_uid, state FROM pull_series WHERE job_id=? AND "
                                  "study_instance_uid=? ORDER BY series_instance_uid", (job_id, study_uid))
        for row in series:
            if row["state"] not in ("queried", "retrieving"):
                continue
            if not self._running(job_id):
                return  # paused, cancelled or stopping: the study stays where it is
            uid = row["series_instance_uid"]
            self._set("pull_series", job_id, uid, "retrieving")
            try:
                problem = self._retrieve_series(client, source_name, job_id, study_uid, uid)
            except SourceError as err:
                problem = str(err)
            if problem is None:
                return  # interrupted
            if problem:
                self._set("pull_series", job_id, uid, "failed", problem)
                self._set("pull_studies", job_id, study_uid, "failed", f"series {uid}: {problem}")
                log.warning("pull job %d: a study failed: %s", job_id, problem)
                return
            self._set("pull_series", job_id, uid, "received")
        last = self.store.query(
            "SELECT MAX(s.last_received) AS t FROM series s JOIN pull_series p ON "
            "p.series_instance_uid=s.series_instance_uid WHERE p.job_id=? AND p.study_instance_uid=?",
            (job_id, study_uid))[0]["t"]
        self._set("pull_studies", job_id, study_uid, "received", None, received_at=last or time.time())

    def _retrieve_series(self, client: Client, source_name: str, job_id: int, study_uid: str,
                         series_uid: str) -> str | None:
        """Fetch what the spool lacks of one series: "" when all is there, a reason when not,
        None when interrupted (paused, cancelled, stopping)."""
        expected = client.instances(study_uid, series_uid)
        if not expected:
            return "the source lists no instances of this series"
        self._set("pull_series", job_id, series_uid, "retrieving", expected=len(expected))
        missing = [uid for uid in expected if uid not in self._stored(series_uid)]
        pace = self.paces[source_name]
        if missing and client.whole_series and len(missing) == len(expected):
            if not pace.wait(len(missing), self.stopping):
                return None
            client.retrieve(self.store, study_uid, series_uid, None, self.min_free_bytes)
        else:
            for uid in missing:  # what an interrupted retrieval left out, one by one
                if not self._running(job_id) or not pace.wait(1, self.stopping):
                    return None
                client.retrieve(self.store, study_uid, series_uid, [uid], self.min_free_bytes)
        absent = len(set(expected) - self._stored(series_uid))
        if not client.through_listener:  # as when a sender's association ends: normally when all came
            self.store.mark_released([series_uid], normally=[] if absent else [series_uid])
        return f"{absent} of {len(expected)} instances did not arrive" if absent else ""

    def _stored(self, series_uid: str) -> set[str]:
        return {r[0] for r in self.store.query(
            "SELECT sop_instance_uid FROM instances WHERE series_instance_uid=?", (series_uid,))}

    # --- processing ----------------------------------------------------------------------------

    def _follow_processing(self) -> None:
        """A received study is processed once it was selected after its last instance arrived and
        none of its jobs is queued or running; failed when one of them failed."""
        for row in self.store.query(
                "SELECT p.job_id, p.study_instance_uid, p.received_at, st.selected_at, pj.query "
                "FROM pull_studies p JOIN studies st USING (study_instance_uid) "
                "JOIN pull_jobs pj ON pj.id=p.job_id WHERE p.state='received' "
                "AND st.selected_at >= p.received_at"):
            jobs = self.store.query(
                "SELECT id, state, error FROM jobs WHERE series_instance_uid IN (SELECT series_instance_uid "
                "FROM series WHERE study_instance_uid=?) AND updated_at >= ? ORDER BY id",
                (row["study_instance_uid"], row["received_at"]))
            if any(j["state"] in ("queued", "running") for j in jobs):
                continue
            failed = [j for j in jobs if j["state"] == "failed"]
            if failed:
                self._set("pull_studies", row["job_id"], row["study_instance_uid"], "failed",
                          f"job {failed[0]['id']} failed: {failed[0]['error']}")
            else:
                reason = f"{len(jobs)} job(s) done" if jobs else "stored: no rule matches its series"
                pattern = PullQuery.from_json(row["query"]).evaluate_against
                if pattern:  # cohort outputs: score what was made against the study's reference
                    from vesalius.node.pull.cohort import evaluate_study

                    reason += "; " + evaluate_study(self.store, row["study_instance_uid"],
                                                    [j["id"] for j in jobs], pattern)
                self._set("pull_studies", row["job_id"], row["study_instance_uid"], "processed", reason)

    def _finish_jobs(self) -> None:
        for job in self.store.query("SELECT id, query FROM pull_jobs WHERE state='running'"):
            counts = {r["state"]: r["n"] for r in self.store.query(
                "SELECT state, COUNT(*) AS n FROM pull_studies WHERE job_id=? GROUP BY state", (job["id"],))}
            if any(counts.get(s) for s in ("queried", "retrieving", "received")):
                continue
            failed = counts.get("failed", 0)
            error = f"{failed} of {sum(counts.values())} studies failed" if failed else None
            if PullQuery.from_json(job["query"]).evaluate_against:
                from vesalius.node.pull.cohort import write_report

                try:
                    folder = write_report(self.store, job["id"])
                    log.info("pull job %d: cohort report in %s", job["id"], folder)
                except Exception as err:  # the job is done all the same; the reason is shown with it
                    log.exception("pull job %d: cohort report failed", job["id"])
                    error = "; ".join(filter(None, [error, f"cohort report failed ({type(err).__name__})"]))
            with self.store.transaction() as db:
                db.execute("UPDATE pull_jobs SET state='done', error=?, updated_at=? WHERE id=? "
                           "AND state='running'", (error, time.time(), job["id"]))
            log.info("pull job %d done%s", job["id"], f" ({error})" if error else "")
