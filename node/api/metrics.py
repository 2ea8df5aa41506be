"""Prometheus /metrics, read from the database at scrape time, so they survive restarts and never drift."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from starlette.requests import Request
from starlette.responses import Response

from vesalius.node.store import DELIVERY_STATES, JOB_STATES, Store


class StoreCollector:
    """One scrape = a few queries; counters come from rows that only grow (or the counters table)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        received = self.store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"]
        yield CounterMetricFamily("vesalius_instances_received",
                                  "Instances stored (distinct SOP Instance UIDs)", value=received)
        # counted when marked, not the current state: a series reopened by a late instance stays counted
        yield CounterMetricFamily("vesalius_series_completed", "Series completions",
                                  value=self.store.counter("series_completed"))
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
        from vesalius.node.corrections import agreement_metrics

        yield from agreement_metrics(self.store)  # corrections (issue 16): agreement per model version


def metrics_endpoint(store: Store) -> Callable[[Request], Response]:
    """The /metrics endpoint over one registry holding only the store's collector."""
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))

    def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics
