"""HTTP for operators and monitoring: /healthz, Prometheus /metrics, and JSON listings."""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from vesalius.node.store import DELIVERY_STATES, JOB_STATES, LISTINGS, Store

log = logging.getLogger("vesalius.api")


class StoreCollector:
    """Metrics read from the database at scrape time, so they survive restarts and never drift."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        received = self.store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"]
        yield CounterMetricFamily("vesalius_instances_received",
                                  "Instances stored (distinct SOP Instance UIDs)", value=received)
        completed = self.store.query("SELECT COUNT(*) AS n FROM series WHERE state='complete'")[0]["n"]
        yield CounterMetricFamily("vesalius_series_completed", "Series marked complete", value=completed)
        jobs = GaugeMetricFamily("vesalius_jobs", "Jobs by state", labels=["state"])
        for state, n in self.store.counts("jobs", JOB_STATES).items():
            jobs.add_metric([state], n)
        yield jobs
        deliveries = GaugeMetricFamily("vesalius_deliveries", "Deliveries by state", labels=["state"])
        for state, n in self.store.counts("deliveries", DELIVERY_STATES).items():
            deliveries.add_metric([state], n)
        yield deliveries
        stages = SummaryMetricFamily("vesalius_job_stage_seconds", "Time spent per pipeline stage",
                                     labels=["stage"])
        totals: dict[str, list[float]] = {}
        for row in self.store.query("SELECT stages FROM jobs WHERE stages IS NOT NULL"):
            for stage, seconds in json.loads(row["stages"]).items():
                totals.setdefault(stage, []).append(seconds)
        for stage, values in sorted(totals.items()):
            stages.add_metric([stage], count_value=len(values), sum_value=sum(values))
        yield stages


def make_server(store: Store, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server (not yet started) over the node's store."""
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path, _, query = self.path.partition("?")
            params = urllib.parse.parse_qs(query)
            if path == "/healthz":
                store.query("SELECT 1")
                self._send(200, b'{"status": "ok"}\n', "application/json")
            elif path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path.lstrip("/") in LISTINGS:
                study = params.get("study", [None])[-1]  # ?study=UID: one study's rows
                rows = store.listing(path.lstrip("/"), study=study)
                self._send(200, json.dumps(rows, indent=1).encode(), "application/json")
            else:
                self._send(404, b'{"error": "not found"}\n', "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            log.debug("http %s", format % args)

    return ThreadingHTTPServer((host, port), Handler)


def start_server(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return thread
