"""The running node: wires the listener, series completion, job runner, sender and HTTP API."""

from __future__ import annotations

import logging
import threading
import time
from importlib.metadata import version

from pynetdicom.transport import ThreadedAssociationServer
from starlette.routing import BaseRoute

from vesalius.node import audit, database
from vesalius.node.api import HttpServer, create_app, load_tokens
from vesalius.node.checks import ConfigError
from vesalius.node.config import Config, config_digest
from vesalius.node.decode_ahead import DecodeAhead
from vesalius.node.jobs import Executor, JobRunner
from vesalius.node.leases import Leases
from vesalius.node.pull.runner import PullRunner
from vesalius.node.receive import Receiver, build_ae
from vesalius.node.routing import may_take
from vesalius.node.send import Sender
from vesalius.node.series import complete_due_series, select_due_studies
from vesalius.node.spool_recovery import recover_rows
from vesalius.node.store import Store
from vesalius.node.tls import server_context, start_tls_server

log = logging.getLogger("vesalius.node")


STARTUP_WAIT = 60.0  # s a starting node waits for its database (a PostgreSQL starting beside it)


def open_store(config: Config, wait: float = STARTUP_WAIT) -> Store:
    """The node's store; a database not reachable yet is tried again for ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return Store(config.data_dir, config.database.url)
        except database.OperationalError as err:
            if time.monotonic() > deadline:
                raise
            log.warning("database %s not reachable yet, trying again: %s",
                        database.shown(config.database.url), str(err).splitlines()[0])
            time.sleep(2.0)


def _executor(config: Config) -> Executor | None:
    """Where pipelines run: a Ray cluster when ``[ray] address`` is set (Ray imported only then),
    else None, the job runner's local worker processes."""
    if not config.ray.address:
        return None
    from vesalius.node.ray_runner import RayWorkers

    return RayWorkers(config)


class Node:
    """Start, serve, stop. All state lives in the store, so a restart resumes unfinished work."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = open_store(config)
        self.audit = audit.Audit(self.store)
        self.tokens = load_tokens(self.store.data_dir, config.http_tokens)  # before any worker starts
        self.stopping = threading.Event()
        self.job_wake = threading.Event()
        self.send_wake = threading.Event()
        self.completion_wake = threading.Event()  # an association ended normally: its series may be due
        self.leases = Leases(self.store, config.owner, config.lease_seconds)  # one heartbeat per node
        self.runner = JobRunner(self.store, config, self.job_wake, self.stopping,
                                on_done=self.send_wake.set, trail=self.audit, executor=_executor(config),
                                leases=self.leases)
        self.sender = Sender(self.store, config, self.send_wake, self.stopping, trail=self.audit,
                             leases=self.leases)
        self.pull = PullRunner(self.store, config, self.stopping, on_duty=lambda: self.leases.holds("pull"))
        self._completion = threading.Thread(target=self._complete_series, name="series", daemon=True)
        self._retention = threading.Thread(target=self._clean_up, name="retention", daemon=True)
        self._learning = threading.Thread(target=self._recognise_corrections, name="corrections", daemon=True)
        self.dicom_server: ThreadedAssociationServer | None = None
        self.tls_server: ThreadedAssociationServer | None = None
        self.decoder: DecodeAhead | None = None
        self.http_server: HttpServer | None = None

    def start(self) -> None:
        tls_context = server_context(self.config.tls) if self.config.tls else None  # ConfigError now
        for destination in self.config.destinations:
            destination.check()
        try:
            self.leases.register()  # a ConfigError when a live node shares our name and database
        except ConfigError:
            self.runner.shutdown()
            raise
        requeued = self.store.requeue_interrupted_jobs(self.leases.owner)  # only this node's own claims
        if requeued:
            log.info("resuming %d interrupted job(s)", requeued)
        self.leases.start()
        recover_rows(self.store)  # rows a power loss took from fsynced spool files, before any new one
        floor_mb = max(self.config.min_free_disk_mb, self.config.retention.free_space_high_water_mb)
        self.decoder = DecodeAhead(self.store, lambda info: may_take(
            self.config, info.modality, info.sop_class_uid, info.manufacturer), floor_mb * 2**20)
        receiver = Receiver(self.store, min_free_bytes=self.config.min_free_disk_mb * 2**20,
                            node_name=self.leases.owner, lease_seconds=self.config.lease_seconds,
                            on_released=self.completion_wake.set, decode_ahead=self.decoder.submit)
        ae, handlers = build_ae(self.config, receiver, audit.AssociationTally(self.audit))
        models = tuple(dict.fromkeys([*(r.model for r in self.config.rules), *self.config.models]))
        self.http_server = HttpServer(create_app(self.store, self.tokens, self.audit,
                                                 metrics_public=self.config.metrics_public, models=models,
                                                 ohif_url=self.config.dashboard.ohif_url,
                                                 extra_routes=self._extra_routes()),
                                      self.config.http_host, self.config.http_port)
        dicom = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        assert dicom is not None  # non-blocking: the server is returned
        self.dicom_server = dicom
        if tls_context is not None:
            self.tls_server = start_tls_server(ae, (self.config.host, self.config.tls_port), tls_context,
                                               handlers)
        self.http_server.start()
        self.runner.start()
        self.sender.thread.start()
        self._completion.start()
        if self.config.learning.corrections:
            self._learning.start()
        self.pull.thread.start()
        if self.config.retention.interval > 0:
            self._retention.start()
        digest = config_digest(self.config)
        self.audit.record(audit.APPLICATION_ACTIVITY, event_type="Application Start", action="E",
                          user=self.config.ae_title, config_sha256=digest, version=version("vesalius"),
                          dicom_port=dicom.server_address[1],
                          http=f"{self.config.http_host}:{self.http_server.server_address[1]}")
        tls = f" dicom_tls={self.config.host}:{self.tls_server.server_address[1]}" if self.tls_server else ""
        log.info("listening node=%s ae=%s dicom=%s:%d%s http=%s:%d data=%s database=%s destinations=%s "
                 "config_sha256=%s", self.leases.owner, self.config.ae_title, self.config.host,
                 dicom.server_address[1], tls,
                 self.config.http_host, self.http_server.server_address[1], self.store.data_dir,
                 database.shown(self.store.url),
                 ", ".join(d.label for d in self.config.destinations) or "none", digest[:12])

    def _extra_routes(self) -> list[BaseRoute]:
        """Token-protected routes of their own modules: pull jobs and STOW-RS (issue 19)."""
        from vesalius.node.api.pull import pull_routes
        from vesalius.node.api.stow import stow_routes

        return [*pull_routes(self.store, self.config, self.audit), *stow_routes(self.store, self.config)]

    def _complete_series(self) -> None:
        """A tick every 0.2 s, and one at once when an association ended normally (its series
        complete on its release: up to a tick sooner)."""
        while not self.stopping.is_set():
            self.completion_wake.wait(0.2)
            self.completion_wake.clear()
            if self.stopping.is_set():
                return
            try:
                completed = complete_due_series(self.store, self.config)
                if select_due_studies(self.store, self.config) or completed:
                    self.job_wake.set()
            except database.Error as err:
                database.pause_after_outage("series completion", err, self.stopping)
            except Exception:  # keep serving; the next tick tries again
                log.exception("series completion failed")

    def _recognise_corrections(self) -> None:
        """Received SEG series that correct our jobs (node/corrections.py), off the completion thread:
        scoring one reads both segmentations; one node at a time (its "corrections" duty)."""
        from vesalius.node.corrections import recognise_pending

        while not self.stopping.wait(1.0):
            try:
                if self.leases.holds("corrections"):
                    recognise_pending(self.store, make_cases=self.config.learning.case_library)
            except database.Error as err:
                database.pause_after_outage("recognising corrections", err, self.stopping)
            except Exception:  # keep serving; the next tick tries again
                log.exception("recognising corrections failed")

    def _clean_up(self) -> None:
        """Retention (node/retention.py) at start-up, then every [retention] interval; by the
        node holding the "retention" duty."""
        from vesalius.node.retention import cleanup

        while True:
            try:
                if self.leases.holds("retention"):
                    cleanup(self.store, self.config.retention)
            except Exception:  # keep serving; the next round tries again
                log.exception("retention cleanup failed")
            if self.stopping.wait(self.config.retention.interval):
                return

    def stop(self) -> None:
        """Stop within a second or two: listeners close, running jobs are interrupted and queued
        again (as after a crash), a delivery in flight is retried at the next start."""
        self.stopping.set()
        servers = (self.dicom_server, self.tls_server, self.http_server)
        listeners = [threading.Thread(target=server.shutdown, daemon=True) for server in servers if server]
        for thread in listeners:
            thread.start()
        self.runner.shutdown()
        self.pull.shutdown()
        for thread in listeners:
            thread.join(timeout=2)
        if self.decoder is not None:
            self.decoder.shutdown()
        self.sender.thread.join(timeout=1)
        requeued = self.store.requeue_interrupted_jobs(self.leases.owner)
        self.leases.stop()
        self.audit.record(audit.APPLICATION_ACTIVITY, event_type="Application Stop", action="E",
                          user=self.config.ae_title)
        log.info("stopped%s", f"; {requeued} interrupted job(s) queued again" if requeued else "")

    def serve_forever(self) -> None:
        """Run until SIGINT (Ctrl-C) or SIGTERM (docker stop, systemd), then stop cleanly."""
        import signal

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self.stopping.set())
        self.start()
        while not self.stopping.wait(0.2):
            pass
        self.stop()
