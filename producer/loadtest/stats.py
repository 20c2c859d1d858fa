"""Statistics of a load test, computed from recorded samples. Pure: no clock, no broker.

A :class:`Sample` is one request as the generator saw it: when it was due, when it was published, when
its reply came back (seconds from the start of the run) and the ``parameters.timing`` entry of the reply.
:func:`summarize` turns a list of samples (and queue-depth readings) into a :class:`Summary`: counts,
throughput, latency percentiles, the per-stage breakdown, the batch-size distribution, errors, and
per-window series for the plot.

Latency runs from the time a request was *due* to the arrival of its reply, so a generator that falls
behind its schedule shows up as latency (stage ``send_lag``), not as a lower offered rate.

Percentiles use linear interpolation between closest ranks (numpy's default).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

OK = "ok"
"""Outcome of a request answered with a result."""
NO_REPLY = "no_reply"
"""Outcome of a request whose reply did not arrive before its timeout or the end of the drain."""
PUBLISH_FAILED = "publish_failed"
"""Outcome of a request the broker refused, returned or never confirmed."""
PENDING = "pending"
"""Outcome of a request still in flight (never in a finished run)."""

STAGES: tuple[str, ...] = ("send_lag", "broker", "batch_wait", "compute", "return")
"""Where a request's latency goes, in order:

* ``send_lag``: due → published (the generator behind its schedule);
* ``broker``: published → delivered to a worker (``timing.broker_ms``);
* ``batch_wait``: delivered → its model run starts (decode, validation, waiting for the model;
  ``timing.batch_wait_ms``);
* ``compute``: the model run of its batch (``timing.compute_ms``);
* ``return``: the rest: reply encoding, the worker's publish, routing back, the generator's receive.
"""

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


@dataclasses.dataclass(slots=True)
class Sample:
    """One request of a load test. Times are seconds from the start of the run (monotonic clock)."""

    index: int
    scheduled_s: float
    sent_s: float
    rows: int
    confirmed_s: float | None = None
    replied_s: float | None = None
    outcome: str = PENDING
    timing: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def latency_ms(self) -> float | None:
        """Due → reply, in ms; None without a reply."""
        if self.replied_s is None:
            return None
        return (self.replied_s - self.scheduled_s) * 1e3

    def stage_ms(self) -> dict[str, float]:
        """This request's latency split into :data:`STAGES` (only the stages its reply lets us know)."""
        latency = self.latency_ms
        if latency is None:
            return {}
        stages = {"send_lag": (self.sent_s - self.scheduled_s) * 1e3}
        for stage in ("broker", "batch_wait", "compute"):
            value = self.timing.get(f"{stage}_ms")
            if value is not None:
                stages[stage] = float(value)
        stages["return"] = latency - sum(stages.values())
        return stages


@dataclasses.dataclass(frozen=True, slots=True)
class DepthReading:
    """The request queue at one moment: ``t_s`` from the start of the run."""

    t_s: float
    ready: int
    unacked: int | None = None
    consumers: int | None = None


class LatencyStats(msgspec.Struct):
    """Latency of the answered requests, ms."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


class StageStats(msgspec.Struct):
    """One stage of the latency, ms; ``share`` is its part of the mean latency."""

    stage: str
    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    share: float


class BatchBin(msgspec.Struct):
    """Model runs of ``min_rows``..``max_rows`` rows: how many (estimated) and how many requests rode in them."""

    min_rows: int
    max_rows: int
    batches: float
    requests: int

    @property
    def label(self) -> str:
        return str(self.min_rows) if self.min_rows == self.max_rows else f"{self.min_rows}-{self.max_rows}"


class BatchStats(msgspec.Struct):
    """Batch sizes, from the replies' ``timing.batch_rows`` and ``timing.batch_requests``.

    A batch of ``k`` requests yields ``k`` replies that each report it, so each reply counts as
    ``1 / batch_requests`` of a batch. ``mean_rows`` is per model run; ``mean_rows_seen`` is what the
    average request saw (larger: big batches carry more requests).
    """

    batches: float
    mean_rows: float
    mean_requests: float
    mean_rows_seen: float
    max_rows: int
    bins: list[BatchBin]


class Window(msgspec.Struct):
    """One time window of ``bin_s``: requests due in it, replies received in it, latency of those due in it."""

    start_s: float
    sent: int
    ok: int
    errors: int
    inflight: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None


class DepthStats(msgspec.Struct):
    """The request queue during the run: ready messages as the broker reported them."""

    samples: int
    max_ready: int
    max_ready_at_s: float | None
    drained_at_s: float | None
    """First reading with nothing ready after both the peak and the drop of the load (the end of the burst,
    or of sending); None if the queue never emptied."""


class Summary(msgspec.Struct):
    """Everything the report says about one run."""

    sent: int
    ok: int
    errors: dict[str, int]
    error_ratio: float
    rows_ok: int
    send_duration_s: float
    elapsed_s: float
    offered_per_s: float
    throughput_per_s: float
    rows_per_s: float
    peak_throughput_per_s: float
    latency: LatencyStats | None
    stages: list[StageStats]
    publish_confirm: LatencyStats | None
    """Published → confirmed by the broker (not a stage: it overlaps ``broker``); high when the broker pushes back."""
    batches: BatchStats | None
    windows: list[Window]
    depth: DepthStats | None
    bin_s: float


def percentiles(values: Sequence[float] | np.ndarray[Any, Any], qs: Iterable[float] = (50, 90, 99)) -> list[float]:
    """The ``qs`` percentiles of ``values`` (linear interpolation); NaN for each when ``values`` is empty."""
    qs = list(qs)
    if len(values) == 0:
        return [math.nan for _ in qs]
    return [float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), qs)]


def latency_stats(latencies_ms: Sequence[float]) -> LatencyStats | None:
    """Count, mean, p50/p90/p99 and max of latencies (None when there are none)."""
    if not latencies_ms:
        return None
    p50, p90, p99 = percentiles(latencies_ms)
    return LatencyStats(
        count=len(latencies_ms),
        mean_ms=float(np.mean(latencies_ms)),
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        max_ms=float(max(latencies_ms)),
    )


def confirm_stats(samples: Iterable[Sample]) -> LatencyStats | None:
    """How long the broker took to confirm each publish, ms (None when nothing was confirmed)."""
    return latency_stats([(s.confirmed_s - s.sent_s) * 1e3 for s in samples if s.confirmed_s is not None])


def error_counts(samples: Iterable[Sample]) -> dict[str, int]:
    """Requests by outcome other than ``ok``, most frequent first."""
    counts = Counter(s.outcome for s in samples if s.outcome != OK)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def stage_stats(samples: Iterable[Sample]) -> list[StageStats]:
    """The latency of answered requests split into :data:`STAGES`, in that order (stages nobody reported left out)."""
    per_stage: dict[str, list[float]] = {stage: [] for stage in STAGES}
    latencies = []
    for s in samples:
        if s.outcome != OK or s.latency_ms is None:
            continue
        latencies.append(s.latency_ms)
        for stage, value in s.stage_ms().items():
            per_stage[stage].append(value)
    mean_latency = float(np.mean(latencies)) if latencies else math.nan
    out = []
    for stage in STAGES:
        values = per_stage[stage]
        if not values:
            continue
        p50, p90, p99 = percentiles(values)
        mean = float(np.mean(values))
        out.append(
            StageStats(
                stage=stage,
                count=len(values),
                mean_ms=mean,
                p50_ms=p50,
                p90_ms=p90,
                p99_ms=p99,
                max_ms=float(max(values)),
                share=mean / mean_latency if mean_latency > 0 else math.nan,
            )
        )
    return out


def _bucket(rows: int) -> tuple[int, int]:
    low = 1
    for high in _BATCH_BUCKETS:
        if rows <= high:
            return (low, high)
        low = high + 1
    return (low, rows)


def batch_stats(samples: Iterable[Sample]) -> BatchStats | None:
    """Batch-size distribution from the replies' timing (None when no reply carried one)."""
    weights: dict[tuple[int, int], float] = {}
    requests: Counter[tuple[int, int]] = Counter()
    batches = rows_sum = 0.0
    seen_rows = []
    max_rows = 0
    for s in samples:
        rows = s.timing.get("batch_rows")
        reqs = s.timing.get("batch_requests")
        if s.outcome != OK or rows is None or not reqs:
            continue
        rows_i = int(rows)
        share = 1.0 / float(reqs)
        bucket = _bucket(rows_i)
        weights[bucket] = weights.get(bucket, 0.0) + share
        requests[bucket] += 1
        batches += share
        rows_sum += rows_i * share
        seen_rows.append(rows_i)
        max_rows = max(max_rows, rows_i)
    if not seen_rows:
        return None
    bins = [
        BatchBin(min_rows=low, max_rows=high, batches=round(weights[(low, high)], 6), requests=requests[(low, high)])
        for (low, high) in sorted(weights)
    ]
    return BatchStats(
        batches=round(batches, 6),
        mean_rows=rows_sum / batches,
        mean_requests=len(seen_rows) / batches,
        mean_rows_seen=float(np.mean(seen_rows)),
        max_rows=max_rows,
        bins=bins,
    )


def windows(samples: Sequence[Sample], bin_s: float, end_s: float) -> list[Window]:
    """Per-window counts and latency over ``[0, end_s)``.

    ``sent`` counts requests due in the window, ``ok``/``errors`` the replies that arrived in it,
    ``inflight`` the requests due and not yet answered at its end, and the latency percentiles are those
    of the answered requests that were due in it.
    """
    if bin_s <= 0:
        raise ValueError(f"bin_s must be positive, got {bin_s}")
    count = max(1, math.ceil(end_s / bin_s - 1e-9))
    due = np.array([s.scheduled_s for s in samples], dtype=np.float64)
    answered = np.array([s.replied_s if s.replied_s is not None else math.inf for s in samples], dtype=np.float64)
    due_sorted, answered_sorted = np.sort(due), np.sort(answered)
    by_due: list[list[float]] = [[] for _ in range(count)]
    ok = [0] * count
    errors = [0] * count
    for s in samples:
        i = min(int(s.scheduled_s // bin_s), count - 1)
        if s.outcome == OK and s.latency_ms is not None:
            by_due[i].append(s.latency_ms)
        if s.replied_s is not None:
            j = min(int(s.replied_s // bin_s), count - 1)
            if s.outcome == OK:
                ok[j] += 1
            else:
                errors[j] += 1
    out = []
    for i in range(count):
        start, end = i * bin_s, (i + 1) * bin_s
        sent = int(np.searchsorted(due_sorted, end, "left") - np.searchsorted(due_sorted, start, "left"))
        inflight = int(np.searchsorted(due_sorted, end, "left") - np.searchsorted(answered_sorted, end, "left"))
        p50 = p99 = peak = None
        if by_due[i]:
            p50, p99 = percentiles(by_due[i], (50, 99))
            peak = max(by_due[i])
        out.append(
            Window(
                start_s=round(start, 6),
                sent=sent,
                ok=ok[i],
                errors=errors[i],
                inflight=max(0, inflight),
                p50_ms=p50,
                p99_ms=p99,
                max_ms=peak,
            )
        )
    return out


def depth_stats(readings: Sequence[DepthReading], settled_after_s: float) -> DepthStats | None:
    """Peak queue depth, and when the queue was empty again after ``settled_after_s`` (None: no readings)."""
    if not readings:
        return None
    peak = max(readings, key=lambda r: r.ready)
    after_s = max(settled_after_s, peak.t_s)
    drained = next((r.t_s for r in readings if r.t_s >= after_s and r.ready == 0), None)
    return DepthStats(
        samples=len(readings),
        max_ready=peak.ready,
        max_ready_at_s=peak.t_s if peak.ready > 0 else None,
        drained_at_s=drained,
    )


def summarize(
    samples: Sequence[Sample],
    *,
    send_duration_s: float,
    depth: Sequence[DepthReading] = (),
    bin_s: float = 1.0,
    settled_after_s: float | None = None,
) -> Summary:
    """The statistics of one run.

    Args:
        samples: every request the run sent (or tried to).
        send_duration_s: how long the generator sent (the offered rate is ``sent / send_duration_s``).
        depth: queue-depth readings taken during the run.
        bin_s: window length of the per-window series, seconds.
        settled_after_s: when the load dropped (end of the burst, or of sending); the depth statistics report
            when the queue was empty after it. Default: ``send_duration_s``.
    """
    answered = [s for s in samples if s.outcome == OK and s.replied_s is not None]
    latencies = [s.latency_ms for s in answered if s.latency_ms is not None]
    last_reply_s = max((s.replied_s for s in samples if s.replied_s is not None), default=0.0)
    first_due_s = min((s.scheduled_s for s in samples), default=0.0)
    elapsed_s = max(last_reply_s - first_due_s, 0.0)
    errors = error_counts(samples)
    rows_ok = sum(s.rows for s in answered)
    series = windows(samples, bin_s, max(elapsed_s + first_due_s, send_duration_s, bin_s))
    peak = max((w.ok for w in series), default=0) / bin_s
    return Summary(
        sent=len(samples),
        ok=len(answered),
        errors=errors,
        error_ratio=(sum(errors.values()) / len(samples)) if samples else 0.0,
        rows_ok=rows_ok,
        send_duration_s=send_duration_s,
        elapsed_s=elapsed_s,
        offered_per_s=len(samples) / send_duration_s if send_duration_s > 0 else math.nan,
        throughput_per_s=len(answered) / elapsed_s if elapsed_s > 0 else math.nan,
        rows_per_s=rows_ok / elapsed_s if elapsed_s > 0 else math.nan,
        peak_throughput_per_s=peak,
        latency=latency_stats(latencies),
        stages=stage_stats(samples),
        publish_confirm=confirm_stats(samples),
        batches=batch_stats(samples),
        windows=series,
        depth=depth_stats(depth, send_duration_s if settled_after_s is None else settled_after_s),
        bin_s=bin_s,
    )


def timing_entry(parameters: Mapping[str, Any] | None) -> dict[str, float]:
    """The numeric fields of a reply's ``parameters.timing`` entry ({} when absent or malformed)."""
    timing = (parameters or {}).get("timing")
    if not isinstance(timing, Mapping):
        return {}
    return {str(k): float(v) for k, v in timing.items() if isinstance(v, int | float) and not isinstance(v, bool)}
