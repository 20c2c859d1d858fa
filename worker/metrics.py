"""Prometheus metrics of one worker. Names carry their units, per Prometheus conventions."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class WorkerMetrics:
    """The worker's metrics, registered in their own registry (one per worker object)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "qinfer_requests_total",
            "Requests finished, by outcome (ok, an error code, dead_lettered, requeued)",
            ["outcome"],
            registry=r,
        )
        self.rows = Counter("qinfer_rows_total", "Rows computed", registry=r)
        self.redelivered = Counter(
            "qinfer_redelivered_total", "Requests delivered again after an earlier delivery was not acked", registry=r
        )
        self.batch_rows = Histogram("qinfer_batch_rows", "Rows per model run", buckets=_BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram(
            "qinfer_batch_requests", "Requests per model run", buckets=_BATCH_BUCKETS, registry=r
        )
        self.broker_seconds = Histogram(
            "qinfer_broker_seconds",
            "Time from publish to delivery (needs the x-published-ms header)",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_wait_seconds = Histogram(
            "qinfer_batch_wait_seconds",
            "Time from delivery to the start of its model run",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "qinfer_compute_seconds", "Duration of one model run", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.reply_seconds = Histogram(
            "qinfer_reply_seconds",
            "Time from the end of a model run to the broker's confirm of the replies",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inflight = Gauge("qinfer_inflight_requests", "Requests received and not yet settled", registry=r)
        self.model = Info("qinfer_model", "The model this worker serves", registry=r)
        self._outcomes: dict[str, Any] = {}

    def count(self, outcome: str) -> None:
        """Count one finished request by outcome (the labelled child is looked up once per outcome)."""
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self.requests.labels(outcome)
        child.inc()
