"""The planner's plot: replicas, backlog and request latency over time, one column per set of values.

Writes a PNG with matplotlib (the load test's ``report.png`` uses it too; install ``.[plan]`` or
``.[loadtest]``). Called by ``producer.plan.cli``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from producer.plan.simulate import PlanResult


def plot(path: Path, results: Sequence[PlanResult], labels: Sequence[str], title: str) -> None:
    """Write ``path``: for each result, replicas (asked for, ready), backlog (ready, unacked) and latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(results)
    fig, axes = plt.subplots(3, columns, figsize=(6.5 * columns, 8.5), sharex=True, squeeze=False)
    top_replicas = max(max(r.timeline.pods.max(), r.timeline.replicas.max()) for r in results) + 1
    top_backlog = max(max((r.timeline.backlog + r.timeline.unacked).max() for r in results), 1) * 1.1
    answered = [r.latency_s[~np.isnan(r.latency_s)] for r in results]
    top_latency = max(max((a.max() for a in answered if len(a)), default=1.0), 0.01) * 1.1
    for col, (result, label) in enumerate(zip(results, labels, strict=True)):
        tl = result.timeline
        window = (result.arrivals.burst_start_s, result.arrivals.burst_end_s)
        ax = axes[0][col]
        ax.step(tl.t_s, tl.replicas, where="post", label="replicas asked for")
        ax.step(tl.t_s, tl.ready_pods, where="post", label="ready pods")
        ax.step(tl.t_s, tl.pods, where="post", linestyle=":", label="pods (incl. starting, draining)")
        ax.set_ylim(0, top_replicas)
        ax.set_ylabel("pods")
        s = result.summary()
        drain = "never" if s["drain_s"] is None else f"{s['drain_s']:.0f} s"
        ax.set_title(
            f"{label}\np99 {s['p99_s']:.2f} s, past deadline {s['past_deadline']}, "
            f"backlog peak {s['backlog_peak']}, drain {drain}, {s['pod_seconds']:.0f} pod-s",
            fontsize=9,
        )
        ax.legend(fontsize=7, loc="upper right")
        ax = axes[1][col]
        ax.fill_between(tl.t_s, 0, tl.backlog, step="post", alpha=0.5, label="ready (queue)")
        ax.fill_between(tl.t_s, tl.backlog, tl.backlog + tl.unacked, step="post", alpha=0.5, label="unacked (pods)")
        ax.axhline(result.values.target, color="grey", linewidth=0.8, linestyle="--", label="target per replica")
        ax.set_ylim(0, top_backlog)
        ax.set_ylabel("messages")
        ax.legend(fontsize=7, loc="upper right")
        ax = axes[2][col]
        times = np.asarray(result.arrivals.times_s)
        ok = ~np.isnan(result.latency_s)
        ax.scatter(times[ok], result.latency_s[ok], s=2, label="answered")
        if (~ok).any():
            ax.scatter(times[~ok], np.full((~ok).sum(), top_latency * 0.98), s=4, color="red", label="past deadline")
        ax.set_ylim(0, top_latency)
        ax.set_ylabel("latency (s) by due time")
        ax.set_xlabel("seconds")
        ax.legend(fontsize=7, loc="upper right")
        for row in axes:
            row[col].axvspan(*window, color="orange", alpha=0.08)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
