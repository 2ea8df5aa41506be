"""The job runner: takes queued jobs from the store and runs the pipeline in worker processes,
so a model that crashes or runs out of memory never takes the DICOM listener down."""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vesalius.inference.volume import VolumeError
from vesalius.node import audit, database, longitudinal
from vesalius.node.audit import Audit
from vesalius.node.config import Config
from vesalius.node.database import Row
from vesalius.node.paths import inside, uid_file_name
from vesalius.node.pipeline import run_pipeline
from vesalius.node.store import Store, record_progress

if TYPE_CHECKING:
    from vesalius.inference.models.spec import ModelSpec

log = logging.getLogger("vesalius.jobs")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _init_worker(model_specs: dict[str, ModelSpec], gpu_slots: int, node_pid: int) -> None:
    """Give a new worker process the configured models (loaded lazily, then kept); it dies with
    the node and leaves Ctrl-C to the node, which decides what happens to a running job."""
    from vesalius.inference.models.registry import configure
    from vesalius.node.logs import install as redact_library_logs

    redact_library_logs()  # no patient name from a library warning on the node's stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(node_pid)
    configure(model_specs, gpu_slots)


def _die_with_parent(parent: int) -> None:
    """End this worker when the node ends, even by ``kill -9``: the kernel's parent-death signal
    (Linux), and a watcher thread for the case the kernel cannot see (the node thread that started
    the worker ended first, or another OS)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the node died before the signal was armed
        os._exit(1)

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


def _run_reporting_stages(paths: list[str], out: str, model: str, result_key: str, db_url: str,
                          job_id: int, priors: dict[str, dict[str, Any]] | None = None,
                          labelmap: bool = True) -> dict[str, Any]:
    """In the worker: the pipeline, each stage's start written to the job's row as it happens,
    so /jobs and the dashboard show "running: stage n of m" live."""
    def on_stage(stage: str, n: int, of: int) -> None:
        try:
            record_progress(db_url, job_id, stage, n, of)
        except database.Error as err:  # progress is for display only: never the reason a job fails
            log.warning("job %d: could not record its progress: %s", job_id, err)

    return run_pipeline(paths, out, model, result_key=result_key, on_stage=on_stage, priors=priors,
                        labelmap=labelmap)


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


class JobRunner:
    """One thread per worker slot; each slot runs its jobs in a shared process pool."""

    def __init__(self, store: Store, config: Config, wake: threading.Event, stop: threading.Event,
                 on_done: Callable[[], None] = lambda: None, trail: Audit | None = None) -> None:
        self.store = store
        self.trail = trail
        self.on_done = on_done
        self.config = config
        self.wake = wake
        self.stop = stop
        self._pool_lock = threading.Lock()
        self._pool = self._new_pool()
        self.threads = [threading.Thread(target=self._loop, name=f"job-runner-{i}", daemon=True)
                        for i in range(config.workers)]

    def _new_pool(self) -> ProcessPoolExecutor:
        # Each worker loads a model once and keeps it across jobs (inference.models.registry).
        specs = self.config.models
        gpu_slots = self.config.gpu_jobs_per_device
        pool = ProcessPoolExecutor(max_workers=self.config.workers,
                                   mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(specs, gpu_slots, os.getpid()))
        models = tuple(dict.fromkeys(rule.model for rule in self.config.rules))
        for _ in range(self.config.workers):
            pool.submit(_warm_up, models)
        return pool

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def shutdown(self) -> None:
        """Stop now: running jobs are interrupted (their worker processes killed) and left in the
        store as a crash leaves them, for the node to queue again."""
        self.stop.set()
        self.wake.set()
        with self._pool_lock:
            pool = self._pool
        kill_workers(pool)
        for t in self.threads:
            t.join(timeout=2)
        pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        stranded: int | None = None  # a claimed job whose end the database did not take
        while not self.stop.is_set():
            try:
                if stranded is not None:  # back to the queue: it runs again, to the same UIDs
                    self.store.fail_job(stranded, "the database was unavailable when it ended", retry=True)
                    stranded = None
                job = self.store.claim_job()
                if job is None:
                    self.wake.wait(0.5)
                    self.wake.clear()
                    continue
                stranded = job["id"]
                self.run(job)
                stranded = None
            except database.Error as err:
                database.pause_after_outage("job runner", err, self.stop)

    def run(self, job: Row) -> None:
        job_id, series_uid, model = job["id"], job["series_instance_uid"], job["model"]
        paths = [str(p) for p in self.store.series_paths(series_uid)]
        result_key = job["result_key"] or ""
        out = result_dir_for(self.store, series_uid, model, result_key)
        log.info("job start job=%d series=%s model=%s instances=%d attempt=%d",
                 job_id, series_uid, model, len(paths), job["attempts"])
        # the patient's earlier volumes, looked up here: the worker has no store
        study = (longitudinal.safely("find the patient", longitudinal.study_of, self.store, series_uid)
                 if self.config.learning.longitudinal else None)
        priors = (longitudinal.safely("look up priors", longitudinal.priors, self.store, study)
                  if study else None)
        try:
            with self._pool_lock:
                future = self._pool.submit(_run_reporting_stages, paths, str(out), model, result_key,
                                           self.store.url, job_id, priors,
                                           self._wants_labelmap(job))
            summary = future.result()
        except Exception as err:
            if self.stop.is_set():  # the node is stopping and ended the worker: not the job's fault
                log.info("job interrupted job=%d: the node is stopping; it runs again at the next start",
                         job_id)
            else:
                self._job_failed(job, err)
            return
        # a series where the model found nothing has no objects to deliver
        destinations = json.loads(job["destinations"]) if summary["objects"] else []
        self.store.finish_job(job_id, out, summary["stages_s"], destinations)
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
            self.store.fail_job(job["id"], f"cannot place series in space: {err}", retry=False)
            self._audit(job, audit.SERIOUS_FAILURE)
        elif isinstance(err, BrokenProcessPool):
            with self._pool_lock:
                self._pool = self._new_pool()
            self._failed(job, "worker process died (crash or out of memory)")
        else:
            self._failed(job, f"{type(err).__name__}: {err}")

    def _failed(self, job: Row, reason: str) -> None:
        retry = job["attempts"] < self.config.job_attempts
        log.warning("job failed job=%d attempt=%d retry=%s: %s", job["id"], job["attempts"], retry, reason)
        self.store.fail_job(job["id"], reason, retry=retry)
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
