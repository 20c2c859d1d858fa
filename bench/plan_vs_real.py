"""``producer plan`` against reality: the same burst, planned and run on real worker processes.

1. Builds a CPU-heavy MLP (``tests.support.models.mlp_model``), measures its rows/s by batch size in this process
   (one ONNX Runtime thread, as each worker runs), one worker's rate through the broker with a backlog
   (600 requests at once; the in-process table scaled to it), and one real cold start (``worker
   coldstart``'s measurement), and plans the burst with compressed autoscaling values (polls and HPA syncs every 2 s,
   so a minute of load shows scale-up and scale-down).
2. Runs the burst for real: the load test's runner offers the same profile to a queue of its own while
   this script starts and stops ``worker run`` processes when the plan's replica timeline says so
   (start: a fresh process, its cold start real; stop: SIGTERM, the worker drains).
3. Prints the backlog peak (ready messages), the time to drain (burst end to an empty queue) and the p99
   latency, planned vs measured, with the error, and writes ``comparison.json``, the plan's plot and
   the load test's report under ``--out``.

The replicas follow the plan by construction; what is checked is the queue model (service rate, batches,
prefetch, cold start, drain) against the broker and real processes. Two cores are shared here: the
workers and the load generator compete for them, which the plan (one GPU per pod) does not model.

Run: ``python -m bench.plan_vs_real`` (needs the broker at ``AMQP_URL``; about a minute and a half).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import aio_pika

from producer.loadtest.payloads import PayloadSpec, build_bodies
from producer.loadtest.profiles import Profile
from producer.loadtest.report import ReportContext, write_report
from producer.loadtest.runner import LoadRunner, Snapshot, Target
from producer.loadtest.stats import summarize
from producer.plan.control import Autoscaling, Policy, Rules
from producer.plan.plot import plot
from producer.plan.pods import PodModel
from producer.plan.simulate import PlanResult, simulate
from producer.plan.values import arrivals_from_profile
from producer.wire.names import CONTENT_TYPE_MSGPACK, DEFAULT_AMQP_URL
from tests.support.models import mlp_model
from worker.calibrate import measure
from worker.coldstart import measure_once
from worker.pipelines.tensor import load_pipeline
from worker.settings import Settings

WIDTH = 2048
MAX_BATCH = 8
PREFETCH = 16
WORKER_FLAGS = ["--max-batch", str(MAX_BATCH), "--prefetch", str(PREFETCH), "--intra-op-threads", "1"]
PROFILE = Profile(mode="burst", rate_per_s=10, burst_rate_per_s=250, burst_start_s=5, burst_duration_s=8, duration_s=45)
VALUES = Autoscaling(
    min_replicas=1,
    max_replicas=2,
    target=150,
    polling_s=2,
    cooldown_s=30,
    scale_up=Rules(stabilization_s=0, policies=(Policy(kind="Pods", value=1, period_s=2),)),
    scale_down=Rules(stabilization_s=10, policies=(Policy(kind="Pods", value=1, period_s=5),)),
    metric_lag_s=0,
    hpa_sync_s=2,
)


async def broker_rate(model: Path, amqp_url: str, workers: int = 1, requests: int = 600) -> float:
    """Rows/s of ``workers`` workers together through the broker with a backlog (full batches): replies
    per second while ``requests`` requests, published at once, are answered."""
    queue = f"plan-rate-{uuid.uuid4().hex[:10]}"
    fleet = Fleet(model, queue, amqp_url)
    for _ in range(workers):
        await fleet.start(0.0)
    try:
        await wait_consumers(amqp_url, queue, workers)
        spec = PayloadSpec(kind="tensor", rows=1, input_name="x", dims=(WIDTH,), content_type=CONTENT_TYPE_MSGPACK)
        profile = Profile(mode="constant", rate_per_s=requests * 10, duration_s=0.1, max_requests=requests)
        target = Target(amqp_url=amqp_url, queue=queue, timeout_s=60, drain_timeout_s=60)
        result = await LoadRunner(target, profile, build_bodies(spec), content_type=spec.content_type, rows=1).run()
    finally:
        await fleet.close()
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(queue, if_unused=False, if_empty=False)
    replied = sorted(s.replied_s for s in result.samples if s.replied_s is not None)
    skip = len(replied) // 10  # the first replies come before the backlog forms full batches
    return (len(replied) - 1 - skip) / (replied[-1] - replied[skip])


def plan(model: Path, amqp_url: str, layers: int) -> tuple[PlanResult, PlanResult, dict[str, float]]:
    pipeline = load_pipeline(
        Settings(model=model, intra_op_threads=1, max_batch=MAX_BATCH, log_level="warning").model_config
    )
    in_process = measure(pipeline, [1, 2, 4, 8], seconds_per_size=1.0)
    del pipeline
    import numpy as np

    inputs = {"x": np.zeros((1, WIDTH), dtype=np.float32)}
    cold = asyncio.run(measure_once(model, inputs, amqp_url=amqp_url, extra_args=WORKER_FLAGS))
    # The pod's rate end to end (docs/deploy.md: confirm the in-process ceiling through the broker); the
    # in-process table gives the shape by batch size.
    pod_rate = asyncio.run(broker_rate(model, amqp_url))
    shared_rate = asyncio.run(broker_rate(model, amqp_url, workers=VALUES.max_replicas)) / VALUES.max_replicas
    scale = pod_rate / in_process[MAX_BATCH]
    rates = {b: r * scale for b, r in in_process.items()}
    print(
        f"through the broker: one worker {pod_rate:.0f} rows/s ({scale:.2f} of in process at batch {MAX_BATCH}); "
        f"{VALUES.max_replicas} together {shared_rate:.0f} rows/s each"
    )
    pod = PodModel(rows_per_s=rates, max_batch=MAX_BATCH, prefetch=PREFETCH, cold_start_s=sum(cold.values()))
    arrivals = arrivals_from_profile(PROFILE, timeout_s=30)
    result = simulate(VALUES, pod, arrivals, horizon_s=PROFILE.duration_s + 30, step_s=0.1, drain_grace_s=40)
    # The same plan with each pod at the rate it has when the pods share this machine's cores.
    shared = pod.with_changes(rows_per_s={b: r * shared_rate / pod_rate for b, r in rates.items()})
    shared_result = simulate(VALUES, shared, arrivals, horizon_s=PROFILE.duration_s + 30, step_s=0.1, drain_grace_s=40)
    print(f"model: MLP {WIDTH}x{layers}; rows/s in process {', '.join(f'{b}: {r:.0f}' for b, r in in_process.items())}")
    print(
        f"cold start (spawn to first reply): {pod.cold_start_s:.2f} s ("
        + ", ".join(f"{k} {v:.2f}" for k, v in cold.items())
        + ")"
    )
    return result, shared_result, {str(b): r for b, r in rates.items()}


class Fleet:
    """Real ``worker run`` processes on one queue, started and stopped like pods."""

    def __init__(self, model: Path, queue: str, amqp_url: str) -> None:
        self.model, self.queue, self.amqp_url = model, queue, amqp_url
        self.processes: list[asyncio.subprocess.Process] = []
        self.stopping: list[asyncio.subprocess.Process] = []
        self.events: list[tuple[float, str, int]] = []

    async def start(self, t_s: float) -> None:
        command = [sys.executable, "-m", "worker.cli", "run", "--model", str(self.model), "--queue", self.queue]
        command += ["--log-format", "json", "--http-port", "0", *WORKER_FLAGS]
        process = await asyncio.create_subprocess_exec(
            *command,
            env={**os.environ, "AMQP_URL": self.amqp_url},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self.processes.append(process)
        self.events.append((t_s, "start", len(self.processes)))

    def stop_newest(self, t_s: float) -> None:
        process = self.processes.pop()
        process.send_signal(signal.SIGTERM)  # drain: stop consuming, hand back, finish, close
        self.stopping.append(process)
        self.events.append((t_s, "sigterm", len(self.processes)))

    async def close(self) -> None:
        while self.processes:
            self.stop_newest(-1)
        for process in self.stopping:
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
                await process.wait()


async def wait_consumers(amqp_url: str, queue: str, count: int, timeout_s: float = 120) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                declared = await channel.declare_queue(queue, passive=True)
                if (declared.declaration_result.consumer_count or 0) >= count:
                    return
            if channel.is_closed:
                channel = await connection.channel()
            await asyncio.sleep(0.2)  # polling the broker for a consumer; there is no event to wait on
    raise RuntimeError(f"no {count} consumer(s) on {queue} within {timeout_s:g} s")


async def run_real(planned: PlanResult, model: Path, amqp_url: str, out: Path) -> dict[str, float | None]:
    queue = f"plan-vs-real-{uuid.uuid4().hex[:10]}"
    fleet = Fleet(model, queue, amqp_url)
    timeline = planned.timeline
    for _ in range(int(timeline.replicas[0])):
        await fleet.start(0.0)
    await wait_consumers(amqp_url, queue, int(timeline.replicas[0]))
    started = asyncio.get_running_loop().create_future()

    def on_progress(snapshot: Snapshot) -> None:
        if not started.done():
            started.set_result(time.monotonic() - snapshot.elapsed_s)

    spec = PayloadSpec(kind="tensor", rows=1, input_name="x", dims=(WIDTH,), content_type=CONTENT_TYPE_MSGPACK)
    target = Target(amqp_url=amqp_url, queue=queue, timeout_s=30, drain_timeout_s=40, depth_interval_s=0.25)
    runner = LoadRunner(
        target, PROFILE, build_bodies(spec), content_type=spec.content_type, rows=1, on_progress=on_progress
    )
    load = asyncio.create_task(runner.run())
    try:
        t0 = await asyncio.wait_for(started, 60)
        for t_s, wanted in zip(timeline.t_s, timeline.replicas, strict=True):
            await asyncio.sleep(max(0.0, t0 + t_s - time.monotonic()))  # the plan's clock
            while len(fleet.processes) < wanted:
                await fleet.start(float(t_s))
            while len(fleet.processes) > wanted:
                fleet.stop_newest(float(t_s))
            if load.done():
                break
        result = await load
    finally:
        await fleet.close()
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(queue, if_unused=False, if_empty=False)
    window = PROFILE.burst_window_s
    assert window is not None
    summary = summarize(result.samples, send_duration_s=result.send_duration_s, depth=result.depth,
                        bin_s=1.0, settled_after_s=window[1])  # fmt: skip
    context = ReportContext(queue=queue, amqp_url=amqp_url, depth_source="passive queue declare",
                            label="plan vs real", command="python -m bench.plan_vs_real")  # fmt: skip
    write_report(out / "loadtest", summary=summary, result=result, profile=PROFILE, payload=spec, context=context)
    (out / "fleet.json").write_text(json.dumps(fleet.events) + "\n")
    depth = summary.depth
    drained = depth.drained_at_s if depth else None
    # The rate the pods achieved while there was a backlog: replies over ready-pod seconds (the plan's ready
    # pods, the same timeline and cold start), from the burst start until the queue was empty.
    busy_end = drained if drained is not None else result.send_duration_s
    replies = sum(1 for x in result.samples if x.replied_s is not None and window[0] <= x.replied_s < busy_end)
    in_window = (timeline.t_s >= window[0]) & (timeline.t_s < busy_end)
    pod_s = float(timeline.ready_pods[in_window].sum() * (timeline.t_s[1] - timeline.t_s[0]))
    return {
        "backlog_peak": float(depth.max_ready) if depth else None,
        "drain_s": None if drained is None else drained - window[1],
        "p99_s": summary.latency.p99_ms / 1000 if summary.latency else None,
        "p50_s": summary.latency.p50_ms / 1000 if summary.latency else None,
        "answered": float(summary.ok),
        "achieved_rows_per_pod_s": replies / pod_s if pod_s > 0 else None,
        "sent": float(summary.sent),
    }


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if key.endswith("_s") else f"{value:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reports/plan-vs-real"), help="where to write")
    parser.add_argument("--layers", type=int, default=12, help="dense layers of the MLP (its cost per row)")
    args = parser.parse_args()
    amqp_url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    args.out.mkdir(parents=True, exist_ok=True)
    model = mlp_model(args.out / "mlp.onnx", width=WIDTH, hidden=WIDTH, layers=args.layers)
    planned, shared, rates = plan(model, amqp_url, args.layers)
    plot(args.out / "plan.png", [planned, shared], ["planned: pods independent", "planned: pods sharing 2 cores"],
         f"plan vs real: {PROFILE.describe()}")  # fmt: skip
    real = asyncio.run(run_real(planned, model, amqp_url, args.out))

    def figures(r: PlanResult) -> dict[str, float | None]:
        import numpy as np

        s = r.summary()
        answered = r.latency_s[~np.isnan(r.latency_s)]  # the load test's percentiles are over answered requests
        return {"backlog_peak": float(s["backlog_peak"] or 0), "drain_s": s["drain_s"],
                "p99_s": float(np.percentile(answered, 99)) if len(answered) else None,
                "p50_s": float(np.percentile(answered, 50)) if len(answered) else None,
                "answered": float(r.requests - r.past_deadline)}  # fmt: skip

    plans = {"independent": figures(planned), "shared": figures(shared)}
    achieved = real["achieved_rows_per_pod_s"]
    if achieved:
        # Planned again with the rate the run achieved: what is left is the queue model's own error.
        pod = planned.pod
        replay = pod.with_changes(rows_per_s={b: r * achieved / pod.best_rows_per_s for b, r in pod.rows_per_s.items()})
        again = simulate(VALUES, replay, planned.arrivals, horizon_s=float(planned.end_s), step_s=0.1, drain_grace_s=40)
        plans["achieved"] = figures(again)
        print(f"rate the pods achieved in the run: {achieved:.0f} rows/s per ready pod")
    print(f"{'figure':<14}" + "".join(f"{name:>14}{'error':>8}" for name in plans) + f"{'measured':>12}")
    rows: dict[str, dict[str, float | None]] = {}
    for key in ("backlog_peak", "drain_s", "p99_s", "p50_s", "answered"):
        m = real[key]
        line = f"{key:<14}"
        rows[key] = {"measured": m}
        for name, p in ((n, f[key]) for n, f in plans.items()):
            error = None if p is None or m is None or m == 0 else (p - m) / m
            rows[key][f"planned_{name}"] = p
            rows[key][f"error_{name}"] = error
            line += f"{_fmt(key, p):>14}{'-' if error is None else f'{100 * error:+.0f}%':>8}"
        print(line + f"{_fmt(key, m):>12}")
    (args.out / "comparison.json").write_text(
        json.dumps({"profile": dataclasses.asdict(PROFILE), "rows_per_s": rates,
                    "cold_start_s": planned.pod.cold_start_s, "figures": rows}, indent=2) + "\n"
    )  # fmt: skip
    print(f"written: {args.out}/comparison.json, {args.out}/plan.png, {args.out}/loadtest/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
