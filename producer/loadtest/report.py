"""Write a load test's report: ``report.json``, ``report.md``, ``report.png`` and ``samples.csv`` in one folder.

The JSON holds everything (setup, summary, per-window series, queue-depth readings); the Markdown is
the same for people; the plot shows latency, throughput and queue depth over time with the burst
shaded; ``samples.csv`` has one line per request, so other statistics can be computed later.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from producer.loadtest.payloads import PayloadSpec
from producer.loadtest.profiles import Profile
from producer.loadtest.runner import RunResult
from producer.loadtest.stats import DepthReading, Sample, Summary

REPORT_FORMAT = 1
JSON_FILE = "report.json"
MARKDOWN_FILE = "report.md"
PLOT_FILE = "report.png"
SAMPLES_FILE = "samples.csv"

MARKDOWN_SECTIONS = (
    "Setup",
    "Summary",
    "Latency",
    "Latency by stage",
    "Batch sizes",
    "Errors",
    "Queue depth",
    "Over time",
)
"""The ``##`` headings every Markdown report has, in order."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportContext:
    """What the report says about the setup (besides the profile and payload)."""

    queue: str
    amqp_url: str
    depth_source: str
    label: str = ""
    command: str = ""


def default_folder(root: Path = Path("reports"), now: dt.datetime | None = None) -> Path:
    """``reports/loadtest-YYYYmmdd-HHMMSS`` (local time)."""
    now = now or dt.datetime.now()
    return root / f"loadtest-{now:%Y%m%d-%H%M%S}"


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def report_document(
    *,
    summary: Summary,
    result: RunResult,
    profile: Profile,
    payload: PayloadSpec,
    context: ReportContext,
) -> dict[str, Any]:
    """The JSON report as plain data."""
    return {
        "format": REPORT_FORMAT,
        "started_at": dt.datetime.fromtimestamp(result.started_epoch_s, dt.UTC).isoformat(timespec="seconds"),
        "label": context.label,
        "command": context.command,
        "target": {
            "queue": context.queue,
            "amqp_url": context.amqp_url,
            "consumers_at_start": result.consumers,
            "depth_source": context.depth_source,
        },
        "profile": {**dataclasses.asdict(profile), "description": profile.describe()},
        "payload": {**dataclasses.asdict(payload), "description": payload.describe()},
        "interrupted": result.interrupted,
        "summary": msgspec.to_builtins(summary),
        "depth": [dataclasses.asdict(r) for r in result.depth],
        "files": {"markdown": MARKDOWN_FILE, "plot": PLOT_FILE, "samples": SAMPLES_FILE},
    }


def markdown(
    *,
    summary: Summary,
    result: RunResult,
    profile: Profile,
    payload: PayloadSpec,
    context: ReportContext,
) -> str:
    """The Markdown report."""
    started = dt.datetime.fromtimestamp(result.started_epoch_s, dt.UTC).isoformat(timespec="seconds")
    s = summary
    lines = [f"# Load test {started}", ""]
    if context.label:
        lines += [context.label, ""]
    if result.interrupted:
        lines += ["**Interrupted**: sending stopped early; the numbers cover what was sent.", ""]
    lines += [
        "## Setup",
        "",
        f"- Profile: {profile.describe()}",
        f"- Payload: {payload.describe()}",
        f"- Queue: `{context.queue}` at `{context.amqp_url}`, {result.consumers} consumer(s) at start",
        f"- Queue depth from: {context.depth_source}",
    ]
    if context.command:
        lines.append(f"- Command: `{context.command}`")
    lines += [
        "",
        "## Summary",
        "",
        "| | |",
        "|---|---:|",
        f"| Requests sent | {s.sent:,} |",
        f"| Answered ok | {s.ok:,} |",
        f"| Errors | {sum(s.errors.values()):,} ({s.error_ratio:.2%}) |",
        f"| Offered rate | {_fmt(s.offered_per_s)} req/s over {s.send_duration_s:.1f} s |",
        f"| Throughput | {_fmt(s.throughput_per_s)} req/s, {_fmt(s.rows_per_s)} rows/s over {s.elapsed_s:.1f} s |",
        f"| Peak throughput | {_fmt(s.peak_throughput_per_s)} req/s (best {s.bin_s:g} s window) |",
        "",
        "## Latency",
        "",
        "From the time a request was due to the arrival of its reply (answered requests only).",
        "",
    ]
    if s.latency is None:
        lines += ["No request was answered.", ""]
    else:
        lat = s.latency
        lines += [
            "| count | mean | p50 | p90 | p99 | max |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {lat.count:,} | {_fmt(lat.mean_ms)} ms | {_fmt(lat.p50_ms)} ms | {_fmt(lat.p90_ms)} ms "
            f"| {_fmt(lat.p99_ms)} ms | {_fmt(lat.max_ms)} ms |",
            "",
        ]
    lines += [
        "## Latency by stage",
        "",
        "From each reply's `parameters.timing` (worker side) and the generator's clock: `send_lag` due → "
        "published, `broker` published → delivered, `batch_wait` delivered → model run starts, `compute` the "
        "model run, `return` the rest (reply encode and publish, routing back, receive).",
        "",
    ]
    if s.stages:
        lines += ["| stage | mean | p50 | p90 | p99 | max | share of mean |", "|---|---:|---:|---:|---:|---:|---:|"]
        for st in s.stages:
            lines.append(
                f"| {st.stage} | {_fmt(st.mean_ms, 2)} ms | {_fmt(st.p50_ms, 2)} ms | {_fmt(st.p90_ms, 2)} ms "
                f"| {_fmt(st.p99_ms, 2)} ms | {_fmt(st.max_ms, 2)} ms | {st.share:.0%} |"
            )
        lines.append("")
    else:
        lines += ["No answered request.", ""]
    if s.publish_confirm is not None:
        pc = s.publish_confirm
        lines += [
            f"Publish confirms (published → confirmed, overlapping `broker`): p50 {_fmt(pc.p50_ms, 2)} ms, "
            f"p99 {_fmt(pc.p99_ms, 2)} ms, max {_fmt(pc.max_ms, 2)} ms; slow confirms mean the broker pushed back "
            "on the generator (flow control).",
            "",
        ]
    lines += ["## Batch sizes", ""]
    if s.batches is None:
        lines += ["No reply carried batch timing.", ""]
    else:
        b = s.batches
        lines += [
            f"About {b.batches:,.0f} model runs; {b.mean_rows:.1f} rows and {b.mean_requests:.1f} requests per "
            f"run on average; the average request ran in a batch of {b.mean_rows_seen:.1f} rows; largest "
            f"{b.max_rows} rows.",
            "",
            "| rows per run | runs | requests |",
            "|---:|---:|---:|",
        ]
        lines += [f"| {bin_.label} | {bin_.batches:,.0f} | {bin_.requests:,} |" for bin_ in b.bins]
        lines.append("")
    lines += ["## Errors", ""]
    if s.errors:
        lines += ["| outcome | requests |", "|---|---:|"]
        lines += [f"| {code} | {count:,} |" for code, count in s.errors.items()]
        lines.append("")
    else:
        lines += ["None.", ""]
    lines += ["## Queue depth", ""]
    if s.depth is None:
        lines += ["No readings.", ""]
    else:
        d = s.depth
        peak_at = f" at {d.max_ready_at_s:.1f} s" if d.max_ready_at_s is not None else ""
        settled = profile.burst_window_s[1] if profile.burst_window_s else s.send_duration_s
        drained = (
            f"empty again at {d.drained_at_s:.1f} s ({d.drained_at_s - settled:.1f} s after the load dropped at "
            f"{settled:g} s)"
            if d.drained_at_s is not None
            else "not empty again before the end of the run"
        )
        lines += [
            f"{d.samples} readings; at most {d.max_ready:,} ready messages{peak_at}; {drained}. Ready messages "
            "only: what the workers already prefetched is in flight, not ready.",
            "",
        ]
    lines += ["## Over time", "", f"![latency, throughput and queue depth over time]({PLOT_FILE})", ""]
    lines += [
        f"Files: [{JSON_FILE}]({JSON_FILE}) (everything above, per-window series, depth readings), "
        f"[{SAMPLES_FILE}]({SAMPLES_FILE}) (one line per request).",
        "",
    ]
    return "\n".join(lines)


def write_samples_csv(path: Path, samples: Sequence[Sample]) -> None:
    """One line per request: times in seconds from the start, stages in ms."""
    timing_fields = ("broker_ms", "batch_wait_ms", "compute_ms", "batch_rows", "batch_requests")
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "index",
                "scheduled_s",
                "sent_s",
                "confirmed_s",
                "replied_s",
                "outcome",
                "rows",
                "latency_ms",
                *timing_fields,
            ]
        )
        for s in samples:
            latency = s.latency_ms
            writer.writerow(
                [
                    s.index,
                    f"{s.scheduled_s:.6f}",
                    f"{s.sent_s:.6f}",
                    "" if s.confirmed_s is None else f"{s.confirmed_s:.6f}",
                    "" if s.replied_s is None else f"{s.replied_s:.6f}",
                    s.outcome,
                    s.rows,
                    "" if latency is None else f"{latency:.3f}",
                    *("" if s.timing.get(k) is None else s.timing[k] for k in timing_fields),
                ]
            )


def plot(
    path: Path, summary: Summary, samples: Sequence[Sample], depth: Sequence[DepthReading], profile: Profile
) -> None:
    """Latency, throughput and queue depth over time, the burst shaded, as a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 9), layout="constrained")
    ax_lat, ax_tp, ax_depth = fig.subplots(3, 1, sharex=True)
    bin_s = summary.bin_s
    mids = [w.start_s + bin_s / 2 for w in summary.windows]

    ok = [(s.scheduled_s, s.latency_ms) for s in samples if s.outcome == "ok" and s.latency_ms is not None]
    if ok:
        ax_lat.scatter([t for t, _ in ok], [v for _, v in ok], s=2, alpha=0.25, color="tab:gray", label="request")
    for key, color in (("p50_ms", "tab:blue"), ("p99_ms", "tab:red")):
        points = [(m, getattr(w, key)) for m, w in zip(mids, summary.windows, strict=True) if getattr(w, key)]
        if points:
            ax_lat.plot([m for m, _ in points], [v for _, v in points], color=color, label=key.removesuffix("_ms"))
    failed = [s.scheduled_s for s in samples if s.outcome != "ok"]
    if failed and ok:
        top = max(v for _, v in ok)
        ax_lat.scatter(failed, [top] * len(failed), marker="x", color="tab:red", s=12, label="error")
    if ok and max(v for _, v in ok) > 20 * max(min(v for _, v in ok), 1e-3):
        ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_title(f"{profile.describe()}: latency by due time", loc="left", fontsize=10)
    ax_lat.legend(loc="upper right", fontsize=8)

    ax_tp.step(mids, [w.sent / bin_s for w in summary.windows], where="mid", color="tab:gray", label="offered (due)")
    ax_tp.step(mids, [w.ok / bin_s for w in summary.windows], where="mid", color="tab:green", label="answered")
    if any(w.errors for w in summary.windows):
        ax_tp.step(mids, [w.errors / bin_s for w in summary.windows], where="mid", color="tab:red", label="errors")
    ax_tp.set_ylabel("requests/s")
    ax_tp.legend(loc="upper right", fontsize=8)

    if depth:
        ax_depth.plot([r.t_s for r in depth], [r.ready for r in depth], color="tab:purple", label="queue: ready")
        if any(r.unacked is not None for r in depth):
            ax_depth.plot(
                [r.t_s for r in depth], [r.unacked or 0 for r in depth], color="tab:orange", label="queue: unacked"
            )
    ax_depth.step(
        mids, [w.inflight for w in summary.windows], where="mid", color="tab:gray", ls="--", label="in flight (client)"
    )
    ax_depth.set_ylabel("messages")
    ax_depth.set_xlabel("seconds from start")
    ax_depth.legend(loc="upper right", fontsize=8)

    window = profile.burst_window_s
    for ax in (ax_lat, ax_tp, ax_depth):
        ax.grid(alpha=0.3)
        if window is not None:
            ax.axvspan(window[0], window[1], color="tab:orange", alpha=0.1)
    fig.savefig(path, dpi=110)


def write_report(
    folder: Path,
    *,
    summary: Summary,
    result: RunResult,
    profile: Profile,
    payload: PayloadSpec,
    context: ReportContext,
) -> dict[str, Path]:
    """Write the four files into ``folder`` (created if missing) and return their paths by kind."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": folder / JSON_FILE,
        "markdown": folder / MARKDOWN_FILE,
        "plot": folder / PLOT_FILE,
        "samples": folder / SAMPLES_FILE,
    }
    kwargs: dict[str, Any] = {
        "summary": summary,
        "result": result,
        "profile": profile,
        "payload": payload,
        "context": context,
    }
    paths["json"].write_bytes(msgspec.json.format(msgspec.json.encode(report_document(**kwargs)), indent=2) + b"\n")
    paths["markdown"].write_text(markdown(**kwargs))
    write_samples_csv(paths["samples"], result.samples)
    try:
        plot(paths["plot"], summary, result.samples, result.depth, profile)
    except ImportError as e:  # the producer alone does not need matplotlib
        del paths["plot"]
        with paths["markdown"].open("a") as f:
            f.write(f"\nNo plot: {e}; install the `loadtest` extra (`pip install 'qinfer[loadtest]'`).\n")
    return paths


__all__ = [
    "MARKDOWN_SECTIONS",
    "ReportContext",
    "default_folder",
    "markdown",
    "plot",
    "report_document",
    "write_report",
    "write_samples_csv",
]
