"""The job runner: takes queued jobs from the store and runs the pipeline in worker processes
(or on a Ray cluster: node/ray_runner.py), so a model that crashes or runs out of memory never
takes the DICOM listener down."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from vesalius.inference.series import decoded
from vesalius.inference.volume import VolumeError
from vesalius.node import audit, database, longitudinal
from vesalius.node.audit import Audit
from vesalius.node.config import Config
from vesalius.node.database import Row
from vesalius.node.forked import die_with_parent
from vesalius.node.leases import Leases
from vesalius.node.paths import inside, uid_file_name
from vesalius.node.pipeline import run_pipeline
from vesalius.node.store import Claim, Store, record_progress, results_ready

if TYPE_CHECKING:
    from vesalius.inference.models.spec import ModelSpec

log = logging.getLogger("vesalius.jobs")


def _init_worker(model_specs: dict[str, ModelSpec], gpu_slots: int, node_pid: int) -> None:
    """Give a new worker process the configured models (loaded lazily, then kept); it dies with
    the node and leaves Ctrl-C to the node, which decides what happens to a running job."""
    from vesalius.inference.memory import map_large_blocks
    from vesalius.inference.models.registry import configure
    from vesalius.node.logs import install as redact_library_logs

    map_large_blocks()  # its threads' freed arrays do not stay resident (inference.memory)
    redact_library_logs()  # no patient name from a library warning on the node's stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(node_pid)
    configure(model_specs, gpu_slots)


def _die_with_parent(parent: int) -> None:
    """End this worker when the node ends, even by ``kill -9``: the kernel's parent-death signal
    (Linux), and a watcher thread for the case the kernel cannot see (the node thread that started
    the worker ended first, or another OS)."""
    die_with_parent(parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="watch-node", daemon=True).start()


def _warm_up(models: tuple[str, ...] = ()) -> None:
    """Import the heavy libraries and load the routed models once per worker, before the first
    series arrives; a model that fails here fails its first job with the reason."""
    import vesalius.dicom_out.seg  # noqa: F401
    import vesalius.dicom_out.sr  # noqa: F401
    import vesalius.dicom_out.surface_segmentation  # noqa: F401
    import vesalius.inference.models  # noqa: F401
    import vesalius.inference.surfaces  # noqa: F401
    from vesalius.inference.models.registry import resolve

    for model in models:
        try:
            resolve(model)
        except Exception as err:  # reported by the job that uses it
            log.warning("worker could not preload model %s: %s", model, err)


@dataclass(frozen=True)
class PipelineCall:
    """One job's pipeline run, as plain data a worker process or a Ray actor receives: absolute
    paths in the spool and results folder (shared storage when workers run elsewhere)."""

    paths: list[str]
    out: str
    model: str
    result_key: str
    db_path: str  # the store's url: a SQLite file's path or a postgresql:// URL (record_progress)
    job_id: int
    priors: dict[str, dict[str, Any]] | None
    labelmap: bool
    # where the first objects go while the rest is written (results_ready), under the job's claim
    destinations: list[str]
    claim: tuple[str, int] | None

    def run(self) -> dict[str, Any]:
        """In the worker: the pipeline with live progress (the summary of run_pipeline)."""
        return _run_reporting_stages(**asdict(self))


class WorkerLost(Exception):
    """The worker running a job died (a crash, out of memory, its machine gone): not the series'
    fault, so the job is tried again within its attempts."""


class Executor(Protocol):
    """Where pipeline runs happen: the local process pool (the default) or a Ray cluster
    (node/ray_runner.py). ``slot`` waits up to ``timeout`` s for a free worker and yields the
    function that runs a call there (None: none free yet), so a job is claimed only when a worker
    can take it; the function raises WorkerLost when the worker dies."""

    slots: int  # jobs running at once: one runner thread each

    def slot(self, timeout: float) -> AbstractContextManager[Callable[[PipelineCall], dict[str, Any]] | None]:
        ...

    def interrupt(self) -> None:
        """End running work now (the node is stopping)."""

    def close(self) -> None:
        """Release the workers, after the runner threads ended."""


def _run_reporting_stages(paths: list[str], out: str, model: str, result_key: str, db_path: str,
                          job_id: int, priors: dict[str, dict[str, Any]] | None = None,
                          labelmap: bool = True, destinations: list[str] | None = None,
                          claim: tuple[str, int] | None = None) -> dict[str, Any]:
    """In the worker: the pipeline, each stage's start written to the job's row as it happens,
    so /jobs and the dashboard show "running: stage n of m" live, and the deliveries of the SEG,
    SR and surfaces queued as soon as they are written (the 3D preview and STLs follow). Once
    the volume is read, the pixels decoded while the series arrived (node.decode_ahead) go."""
    decoded_ahead = {Path(p).parent for p in paths}

    def on_stage(stage: str, n: int, of: int) -> None:
        if stage != "volume":
            while decoded_ahead:
                decoded.remove_folder(decoded_ahead.pop())
        try:
            record_progress(db_path, job_id, stage, n, of)
        except database.Error as err:  # progress is for display only: never the reason a job fails
            log.warning("job %d: could not record its progress: %s", job_id, err)

    def on_results(summary: dict[str, Any]) -> None:
        if not destinations:
            return
        try:
            if not results_ready(db_path, job_id, Claim(*claim) if claim else None, out, destinations):
                log.warning("job %d: first results not queued: another node took the job over", job_id)
        except database.Error as err:  # they go with the rest when the job is done
            log.warning("job %d: could not queue its first results: %s", job_id, err)

    return run_pipeline(paths, out, model, result_key=result_key, on_stage=on_stage, priors=priors,
                        labelmap=labelmap, on_results=on_results)


def _folder(name: str) -> str:
    """One safe folder name: a path-form model (``bundle:/models/x``) or a part of a result key."""
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", name)[:128]
    return safe if safe.strip(".") else "_" + safe


def result_dir_for(store: Store, series_uid: str, model: str, result_key: str | None = None) -> Path:
    """Deterministic per (series, model), or per (study, rule, model) for a study-level rule's
    ``result_key``: a re-run replaces the earlier results. Always inside the results folder."""
    if result_key:
        return inside(store.results_dir, *map(_folder, result_key.split("/")), _folder(model))
    return inside(store.results_dir, uid_file_name(series_uid), _folder(model))


def kill_workers(pool: ProcessPoolExecutor) -> None:
    """End a pool's worker processes now, whatever they run: ``ProcessPoolExecutor.kill_workers``
    of Python 3.14, for the Pythons before it (which only offer to wait for running tasks)."""
    kill = getattr(pool, "kill_workers", None)
    if kill is not None:
        kill()
        return
    for process in list((pool._processes or {}).values()):
        process.kill()


class ProcessPoolWorkers:
    """The embedded executor: ``workers`` spawned processes on this machine, rebuilt when one dies."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.slots = config.workers
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # Each worker loads a model once and keeps it across jobs (inference.models.registry).
        specs = self.config.models
        gpu_slots = self.config.gpu_jobs_per_device
        pool = ProcessPoolExecutor(max_workers=self.config.workers,
                                   mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(specs, gpu_slots, os.getpid()))
        for _ in range(self.config.workers):
            pool.submit(_warm_up, routed_models(self.config))
        return pool

    @contextmanager
    def slot(self, timeout: float) -> Iterator[Callable[[PipelineCall], dict[str, Any]]]:
        yield self._run  # one runner thread per worker process: a thread's worker is always free

    def _run(self, call: PipelineCall) -> dict[str, Any]:
        with self._lock:
            pool = self._pool
            future = pool.submit(PipelineCall.run, call)
        try:
            return future.result()
        except BrokenProcessPool as err:
            with self._lock:
                if self._pool is pool:
                    self._pool = self._new_pool()
            raise WorkerLost("worker process died (crash or out of memory)") from err

    def interrupt(self) -> None:
        with self._lock:
            kill_workers(self._pool)

    def close(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=False, cancel_futures=True)


def routed_models(config: Config) -> tuple[str, ...]:
    """The models the rules name, each once: what a worker preloads."""
    return tuple(dict.fromkeys(rule.model for rule in config.rules))


class JobRunner:
    """One thread per worker slot: claim a job, run its pipeline on the executor (local worker
    processes unless given another), finish or fail it in the store."""

    def __init__(self, store: Store, config: Config, wake: threading.Event, stop: threading.Event,
                 on_done: Callable[[], None] = lambda: None, trail: Audit | None = None,
                 executor: Executor | None = None, leases: Leases | None = None) -> None:
        self.store = store
        # the node's heartbeat renews the claims held here (none given: claims are not renewed)
        self.leases = leases or Leases(store, config.owner, config.lease_seconds)
        self.trail = trail
        self.on_done = on_done
        self.config = config
        self.wake = wake
        self.stop = stop
        self.executor: Executor = executor if executor is not None else ProcessPoolWorkers(config)
        self.threads = [threading.Thread(target=self._loop, name=f"job-runner-{i}", daemon=True)
                        for i in range(self.executor.slots)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def shutdown(self) -> None:
        """Stop now: running jobs are interrupted (their workers killed) and left in the store as
        a crash leaves them, for the node to queue again."""
        self.stop.set()
        self.wake.set()
        self.executor.interrupt()
        for t in self.threads:
            if t.ident is not None:  # started (a node refused at start-up never starts them)
                t.join(timeout=2)
        self.executor.close()

    def _loop(self) -> None:
        stranded: tuple[int, Claim | None] | None = None  # a claimed job whose end the database did not take
        while not self.stop.is_set():
            try:
                if stranded is not None:  # back to the queue (fenced by its claim): it runs again, same UIDs
                    self.store.fail_job(stranded[0], "the database was unavailable when it ended", retry=True,
                                        claim=stranded[1])
                    stranded = None
                with self.executor.slot(timeout=0.5) as worker:
                    if worker is None:
                        continue
                    job = self.store.claim_job(self.leases.owner, self.leases.lease_seconds,
                                               self.config.job_attempts)
                    if job is None:
                        self.wake.wait(0.5)
                        self.wake.clear()
                        continue
                    claim = Claim.of(job)
                    self.leases.hold("jobs", job["id"], claim)
                    stranded = (job["id"], claim)
                    try:
                        self.run(job, worker)
                    finally:
                        self.leases.drop("jobs", job["id"])
                    stranded = None
            except database.Error as err:
                database.pause_after_outage("job runner", err, self.stop)

    def run(self, job: Row, worker: Callable[[PipelineCall], dict[str, Any]]) -> None:
        job_id, series_uid, model = job["id"], job["series_instance_uid"], job["model"]
        paths = [str(p) for p in self.store.series_paths(series_uid)]
        result_key = job["result_key"] or ""
        out = result_dir_for(self.store, series_uid, model, result_key)
        log.info("job start job=%d series=%s model=%s instances=%d attempt=%d node=%s",
                 job_id, series_uid, model, len(paths), job["attempts"], job["lease_owner"])
        # the patient's earlier volumes, looked up here: the worker has no store
        study = (longitudinal.safely("find the patient", longitudinal.study_of, self.store, series_uid)
                 if self.config.learning.longitudinal else None)
        priors = (longitudinal.safely("look up priors", longitudinal.priors, self.store, study)
                  if study else None)
        claim = Claim.of(job)
        call = PipelineCall(paths, str(out), model, result_key, self.store.url, job_id, priors,
                            self._wants_labelmap(job), json.loads(job["destinations"]),
                            (claim.owner, claim.attempt) if claim else None)
        try:
            summary = worker(call)
        except Exception as err:
            if self.stop.is_set():  # the node is stopping and ended the worker: not the job's fault
                log.info("job interrupted job=%d: the node is stopping; it runs again at the next start",
                         job_id)
            else:
                self._job_failed(job, err)
            return
        # a series where the model found nothing has no objects to deliver
        destinations = json.loads(job["destinations"]) if summary["objects"] else []
        if not self.store.finish_job(job_id, out, summary["stages_s"], destinations, Claim.of(job)):
            log.warning("job result not recorded job=%d attempt=%d: another node took the job over after "
                        "this node's lease expired; its run counts", job_id, job["attempts"])
            return
        if study is not None:
            longitudinal.safely("record the volumes", longitudinal.record, self.store, job_id, study,
                                summary["structures"])
        self._audit(job, audit.SUCCESS, summary)
        self.on_done()
        log.info("job done job=%d series=%s stages=%s deliveries=%d",
                 job_id, series_uid, summary["stages_s"], len(destinations))

    def _wants_labelmap(self, job: Row) -> bool:
        """Whether a destination of the job takes the Label Map SEG: only then is it written."""
        names = set(json.loads(job["destinations"]))
        return any(d.labelmap for d in self.config.destinations if d.name in names)

    def _job_failed(self, job: Row, err: Exception) -> None:
        if isinstance(err, VolumeError):  # the series itself is the problem: retrying cannot help
            log.warning("job failed job=%d series=%s: %s", job["id"], job["series_instance_uid"], err)
            if self.store.fail_job(job["id"], f"cannot place series in space: {err}", retry=False,
                                   claim=Claim.of(job)):
                self._audit(job, audit.SERIOUS_FAILURE)
        elif isinstance(err, WorkerLost):
            self._failed(job, str(err))
        else:
            self._failed(job, f"{type(err).__name__}: {err}")

    def _failed(self, job: Row, reason: str) -> None:
        retry = job["attempts"] < self.config.job_attempts
        log.warning("job failed job=%d attempt=%d retry=%s: %s", job["id"], job["attempts"], retry, reason)
        if self.store.fail_job(job["id"], reason, retry=retry, claim=Claim.of(job)):
            self._audit(job, audit.MINOR_FAILURE if retry else audit.SERIOUS_FAILURE)

    def _audit(self, job: Row, outcome: int, summary: dict[str, Any] | None = None) -> None:
        """DICOM Instances Accessed: the job read a series and (on success) created these objects."""
        if self.trail is None:
            return
        summary = summary or {}
        model = summary.get("model", {})
        self.trail.record(audit.INSTANCES_ACCESSED, outcome=outcome, action="C", user=self.config.ae_title,
                          job=job["id"], attempt=job["attempts"], series=job["series_instance_uid"],
                          study=summary.get("study_instance_uid"), model=job["model"],
                          model_name=model.get("name"), model_version=model.get("version"),
                          created=[o["sop_instance_uid"] for o in summary.get("objects", {}).values()])
