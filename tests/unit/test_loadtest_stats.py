"""Load-test statistics, on recorded timings with answers worked out by hand."""

from __future__ import annotations

import math

import pytest

from producer.loadtest.stats import (
    NO_REPLY,
    OK,
    PUBLISH_FAILED,
    DepthReading,
    Sample,
    batch_stats,
    depth_stats,
    error_counts,
    latency_stats,
    percentiles,
    stage_stats,
    summarize,
    timing_entry,
    windows,
)


def _ok(index: int, due_s: float, latency_ms: float, **timing: float) -> Sample:
    return Sample(
        index=index,
        scheduled_s=due_s,
        sent_s=due_s,
        rows=1,
        replied_s=due_s + latency_ms / 1e3,
        outcome=OK,
        timing=dict(timing),
    )


def test_percentiles_interpolate_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == pytest.approx([50.5, 90.1, 99.01])
    assert all(math.isnan(v) for v in percentiles([]))


def test_latency_stats_of_answered_requests() -> None:
    stats = latency_stats([float(v) for v in range(1, 101)])
    assert stats is not None
    assert (stats.count, stats.mean_ms, stats.p50_ms, stats.p99_ms, stats.max_ms) == pytest.approx(
        (100, 50.5, 50.5, 99.01, 100.0)
    )
    assert latency_stats([]) is None


def test_stages_add_up_to_the_latency_and_return_takes_the_rest() -> None:
    sample = Sample(index=0, scheduled_s=1.0, sent_s=1.002, rows=1, replied_s=1.030, outcome=OK)
    sample.timing = {"broker_ms": 5.0, "batch_wait_ms": 3.0, "compute_ms": 12.0, "batch_rows": 4, "batch_requests": 2}
    stages = sample.stage_ms()
    assert stages == pytest.approx({"send_lag": 2.0, "broker": 5.0, "batch_wait": 3.0, "compute": 12.0, "return": 8.0})
    assert sum(stages.values()) == pytest.approx(sample.latency_ms)


def test_a_reply_without_the_broker_header_folds_broker_time_into_return() -> None:
    sample = _ok(0, 0.0, 20.0, batch_wait_ms=1.0, compute_ms=4.0)
    assert sample.stage_ms() == pytest.approx({"send_lag": 0.0, "batch_wait": 1.0, "compute": 4.0, "return": 15.0})


def test_stage_stats_give_percentiles_and_shares_of_the_mean_latency() -> None:
    samples = [
        _ok(0, 0.0, 10.0, broker_ms=2.0, batch_wait_ms=1.0, compute_ms=5.0),
        _ok(1, 0.1, 30.0, broker_ms=6.0, batch_wait_ms=3.0, compute_ms=15.0),
        Sample(index=2, scheduled_s=0.2, sent_s=0.2, rows=1, outcome=NO_REPLY),
    ]
    by_stage = {s.stage: s for s in stage_stats(samples)}
    assert list(by_stage) == ["send_lag", "broker", "batch_wait", "compute", "return"]
    assert by_stage["compute"].count == 2
    assert by_stage["compute"].mean_ms == pytest.approx(10.0)
    assert by_stage["compute"].p50_ms == pytest.approx(10.0)
    assert by_stage["compute"].max_ms == pytest.approx(15.0)
    assert by_stage["compute"].share == pytest.approx(0.5)  # 10 of a 20 ms mean
    assert by_stage["return"].mean_ms == pytest.approx(4.0)  # (10-8 + 30-24) / 2
    assert sum(s.share for s in by_stage.values()) == pytest.approx(1.0)


def test_batch_distribution_counts_each_run_once_however_many_requests_rode_in_it() -> None:
    # One run of 3 requests, 6 rows in all (each of its 3 replies reports it), and two runs of 1 request, 1 row.
    samples = [_ok(i, 0.0, 5.0, batch_rows=6, batch_requests=3) for i in range(3)]
    samples += [_ok(3 + i, 0.0, 5.0, batch_rows=1, batch_requests=1) for i in range(2)]
    stats = batch_stats(samples)
    assert stats is not None
    assert stats.batches == pytest.approx(3.0)
    assert stats.mean_rows == pytest.approx(8 / 3)
    assert stats.mean_requests == pytest.approx(5 / 3)
    assert stats.mean_rows_seen == pytest.approx(4.0)
    assert stats.max_rows == 6
    assert [(b.label, b.batches, b.requests) for b in stats.bins] == [("1", 2.0, 2), ("5-8", 1.0, 3)]


def test_batch_distribution_is_none_without_timing() -> None:
    assert batch_stats([_ok(0, 0.0, 1.0)]) is None


def test_errors_are_counted_by_outcome_most_frequent_first() -> None:
    samples = [
        _ok(0, 0.0, 1.0),
        Sample(index=1, scheduled_s=0, sent_s=0, rows=1, outcome="deadline_exceeded", replied_s=0.5),
        Sample(index=2, scheduled_s=0, sent_s=0, rows=1, outcome=NO_REPLY),
        Sample(index=3, scheduled_s=0, sent_s=0, rows=1, outcome=NO_REPLY),
        Sample(index=4, scheduled_s=0, sent_s=0, rows=1, outcome=PUBLISH_FAILED),
    ]
    assert list(error_counts(samples).items()) == [(NO_REPLY, 2), ("deadline_exceeded", 1), (PUBLISH_FAILED, 1)]


def test_windows_count_due_answered_and_in_flight_requests() -> None:
    samples = [
        _ok(0, 0.1, 100.0),  # due in window 0, answered in window 0 (0.2 s)
        _ok(1, 0.5, 800.0),  # due in 0, answered in 1 (1.3 s)
        _ok(2, 1.2, 2000.0),  # due in 1, answered in 3 (3.2 s)
        Sample(index=3, scheduled_s=1.5, sent_s=1.5, rows=1, outcome="wrong_shape", replied_s=1.6),
        Sample(index=4, scheduled_s=2.5, sent_s=2.5, rows=1, outcome=NO_REPLY),
    ]
    series = windows(samples, 1.0, 4.0)
    assert [(w.start_s, w.sent, w.ok, w.errors, w.inflight) for w in series] == [
        (0.0, 2, 1, 0, 1),
        (1.0, 2, 1, 1, 1),
        (2.0, 1, 0, 0, 2),
        (3.0, 0, 1, 0, 1),
    ]
    assert series[0].p50_ms == pytest.approx(450.0)
    assert series[0].max_ms == pytest.approx(800.0)
    assert series[2].p50_ms is None


def test_depth_reports_the_peak_and_when_the_queue_was_empty_after_the_load_dropped() -> None:
    readings = [
        DepthReading(t_s=0.0, ready=0),
        DepthReading(t_s=1.0, ready=40),
        DepthReading(t_s=2.0, ready=0),  # empty between two waves of the burst: not drained yet
        DepthReading(t_s=3.0, ready=90),
        DepthReading(t_s=4.0, ready=30),
        DepthReading(t_s=5.0, ready=0),
        DepthReading(t_s=6.0, ready=0),
    ]
    stats = depth_stats(readings, settled_after_s=1.5)
    assert stats is not None
    assert (stats.samples, stats.max_ready, stats.max_ready_at_s, stats.drained_at_s) == (7, 90, 3.0, 5.0)
    assert depth_stats([], 1.0) is None
    never = depth_stats([DepthReading(t_s=0.0, ready=5), DepthReading(t_s=1.0, ready=3)], 0.5)
    assert never is not None
    assert never.drained_at_s is None


def test_summary_of_a_recorded_run() -> None:
    samples = [_ok(i, i * 0.1, 10.0 + i, broker_ms=1.0, batch_wait_ms=1.0, compute_ms=5.0) for i in range(20)]
    samples[5].rows = 3
    samples.append(Sample(index=20, scheduled_s=2.0, sent_s=2.0, rows=1, outcome=NO_REPLY))
    summary = summarize(samples, send_duration_s=2.1, depth=[DepthReading(t_s=0.5, ready=2)], bin_s=0.5)
    assert (summary.sent, summary.ok, summary.errors) == (21, 20, {NO_REPLY: 1})
    assert summary.error_ratio == pytest.approx(1 / 21)
    assert summary.rows_ok == 22
    assert summary.offered_per_s == pytest.approx(21 / 2.1)
    # First due at 0 s, last reply at 1.9 s + 29 ms.
    assert summary.elapsed_s == pytest.approx(1.929)
    assert summary.throughput_per_s == pytest.approx(20 / 1.929)
    assert summary.rows_per_s == pytest.approx(22 / 1.929)
    assert summary.peak_throughput_per_s == pytest.approx(10.0)  # 5 replies in a 0.5 s window
    assert summary.latency is not None
    assert summary.latency.p50_ms == pytest.approx(19.5)
    assert summary.latency.max_ms == pytest.approx(29.0)
    assert [s.stage for s in summary.stages] == ["send_lag", "broker", "batch_wait", "compute", "return"]
    assert summary.publish_confirm is None  # nothing recorded a confirm time
    assert summary.depth is not None
    assert summary.depth.max_ready == 2
    assert sum(w.sent for w in summary.windows) == 21


def test_summary_of_a_run_with_no_replies() -> None:
    samples = [Sample(index=0, scheduled_s=0.0, sent_s=0.0, rows=1, outcome=NO_REPLY)]
    summary = summarize(samples, send_duration_s=1.0)
    assert (summary.ok, summary.latency, summary.batches, summary.stages) == (0, None, None, [])
    assert math.isnan(summary.throughput_per_s)


def test_timing_entry_keeps_numbers_only() -> None:
    parameters = {"timing": {"compute_ms": 1.5, "batch_rows": 4, "flag": True, "note": "x"}, "other": 1}
    assert timing_entry(parameters) == {"compute_ms": 1.5, "batch_rows": 4.0}
    assert timing_entry(None) == {}
    assert timing_entry({"timing": [1, 2]}) == {}
