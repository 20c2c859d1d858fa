"""Prometheus metrics of one worker. Names carry their units, per Prometheus conventions.

Under a supervisor (``worker run --processes N``, see :mod:`worker.supervisor`) every consumer
process starts with ``PROMETHEUS_MULTIPROC_DIR`` set: prometheus-client then keeps each value in a
per-process file there, and the supervisor's ``/metrics`` sums the files. Two metrics change shape in
that mode: the in-flight gauge sums over live processes (``livesum``), and the model info, which the
library cannot share between processes as an ``Info``, is a gauge of 1 with the same name and labels.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_mode() -> bool:
    """True when this process shares its metrics with a supervisor (``PROMETHEUS_MULTIPROC_DIR`` set)."""
    return MULTIPROC_DIR_ENV in os.environ


class ModelInfo(Protocol):
    """What the worker calls to publish the model it serves: an ``Info``, or its multiprocess stand-in."""

    def info(self, val: dict[str, str]) -> None: ...


class _InfoGauge:
    """``qinfer_model_info{name, version, providers} 1`` as a gauge, for multiprocess mode."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._gauge = Gauge(
            "qinfer_model_info",
            "The model this worker serves",
            ["name", "version", "providers"],
            registry=registry,
            multiprocess_mode="livemax",
        )

    def info(self, val: dict[str, str]) -> None:
        self._gauge.labels(val["name"], val["version"], val["providers"]).set(1)


_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class WorkerMetrics:
    """The worker's metrics, registered in their own registry (one per worker object)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "qinfer_requests_total",
            "Requests finished, by outcome (ok, metadata, an error code, dead_lettered, requeued)",
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
        self.inflight = Gauge(
            "qinfer_inflight_requests",
            "Requests received and not yet settled",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.model: ModelInfo = (
            _InfoGauge(r) if multiprocess_mode() else Info("qinfer_model", "The model this worker serves", registry=r)
        )
        self._outcomes: dict[str, Any] = {}

    def count(self, outcome: str) -> None:
        """Count one finished request by outcome (the labelled child is looked up once per outcome)."""
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self.requests.labels(outcome)
        child.inc()
