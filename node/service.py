"""The running node: wires the listener, series completion, job runner, sender and HTTP API."""

from __future__ import annotations

import logging
import threading

from pynetdicom.transport import ThreadedAssociationServer

from vesalius.node.api import make_server, start_server
from vesalius.node.config import Config
from vesalius.node.jobs import JobRunner
from vesalius.node.receive import Receiver, build_ae
from vesalius.node.send import Sender
from vesalius.node.series import complete_due_series, select_due_studies
from vesalius.node.store import Store
from vesalius.node.tls import server_context, start_tls_server

log = logging.getLogger("vesalius.node")


class Node:
    """Start, serve, stop. All state lives in the store, so a restart resumes unfinished work."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.data_dir)
        self.stopping = threading.Event()
        self.job_wake = threading.Event()
        self.send_wake = threading.Event()
        self.runner = JobRunner(self.store, config, self.job_wake, self.stopping,
                                on_done=self.send_wake.set)
        self.sender = Sender(self.store, config, self.send_wake, self.stopping)
        self._completion = threading.Thread(target=self._complete_series, name="series", daemon=True)
        self._retention = threading.Thread(target=self._clean_up, name="retention", daemon=True)
        self.dicom_server = None
        self.tls_server: ThreadedAssociationServer | None = None
        self.http_server = None

    def start(self) -> None:
        tls_context = server_context(self.config.tls) if self.config.tls else None  # ConfigError now
        for destination in self.config.destinations:
            destination.check()
        requeued = self.store.requeue_interrupted_jobs()
        if requeued:
            log.info("resuming %d interrupted job(s)", requeued)
        receiver = Receiver(self.store, min_free_bytes=self.config.min_free_disk_mb * 2**20)
        ae, handlers = build_ae(self.config, receiver)
        self.dicom_server = ae.start_server((self.config.host, self.config.port), block=False,
                                            evt_handlers=handlers)
        if tls_context is not None:
            self.tls_server = start_tls_server(ae, (self.config.host, self.config.tls_port), tls_context,
                                               handlers)
        self.http_server = make_server(self.store, self.config.host, self.config.http_port)
        start_server(self.http_server)
        self.runner.start()
        self.sender.thread.start()
        self._completion.start()
        if self.config.retention.interval > 0:
            self._retention.start()
        tls = f" dicom_tls={self.config.host}:{self.tls_server.server_address[1]}" if self.tls_server else ""
        log.info("listening ae=%s dicom=%s:%d%s http=%s:%d data=%s destinations=%s",
                 self.config.ae_title, self.config.host, self.dicom_server.server_address[1], tls,
                 self.config.host, self.http_server.server_address[1], self.store.data_dir,
                 ", ".join(d.label for d in self.config.destinations) or "none")

    def _complete_series(self) -> None:
        while not self.stopping.wait(0.2):
            try:
                completed = complete_due_series(self.store, self.config)
                if select_due_studies(self.store, self.config) or completed:
                    self.job_wake.set()
            except Exception:  # keep serving; the next tick tries again
                log.exception("series completion failed")

    def _clean_up(self) -> None:
        """Retention (node/retention.py) at start-up, then every [retention] interval."""
        from vesalius.node.retention import cleanup

        while True:
            try:
                cleanup(self.store, self.config.retention)
            except Exception:  # keep serving; the next round tries again
                log.exception("retention cleanup failed")
            if self.stopping.wait(self.config.retention.interval):
                return

    def stop(self) -> None:
        self.stopping.set()
        if self.dicom_server is not None:
            self.dicom_server.shutdown()
        if self.tls_server is not None:
            self.tls_server.shutdown()
        if self.http_server is not None:
            self.http_server.shutdown()
        self.runner.shutdown()
        self.sender.thread.join(timeout=5)
        log.info("stopped")

    def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM."""
        import signal

        self.start()
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        try:
            while not self.stopping.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        self.stop()
