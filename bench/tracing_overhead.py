"""What tracing costs the worker: the broker-bound load of ``bench.broker_bound`` on four workers.

  untraced   the worker as it was before tracing existed (a git ref, ``git merge-base HEAD main`` by
             default, unpacked into a temporary folder and run from there)
  off        this worker with no OTEL_* exporter configured (the default: no SDK, hooks return at once)
  on-100%    this worker exporting every span over OTLP/HTTP to a local receiver process
  on-1%      the same with OTEL_TRACES_SAMPLER=parentbased_traceidratio, OTEL_TRACES_SAMPLER_ARG=0.01

The requests carry no traceparent (the bench's own publisher), so the worker's request spans are
roots and the sampler decides on them; a model run is traced when one of its requests is.
The workers are driven in turn, round after round; each figure is the median over the rounds.
Prints msgs/s at saturation, the worker process's CPU time per request (from /proc, the figure
least disturbed by other load on the machine), p50 with one request in flight, and the ratios
against ``untraced``.

Usage: python -m bench.tracing_overhead [--count 3000] [--window 256] [--single-count 300] [--rounds 3]
                                        [--baseline-ref REF]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np

from bench.driver import AMQP_URL, ROOT, delete_queues, drive
from producer.wire.names import CONTENT_TYPE_MSGPACK
from producer.wire.protocol import encode_request
from tests.support.models import mlp_model
from tests.support.worker_process import LoggedProcess, child_env, worker_command

KINDS = ("untraced", "off", "on-100%", "on-1%")
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unpack(ref: str, into: Path) -> str:
    """Unpack the tree of git ``ref`` into ``into``; returns the commit it names."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, check=True, capture_output=True, text=True)
    archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return commit.stdout.strip()[:12]


def prepare_untraced(ref: str, base: Path) -> str:
    """Unpack ``ref`` into ``base`` and check that a worker started from there is the untraced code."""
    base.mkdir()
    commit = unpack(ref, base)
    check = "import os, worker; print(os.path.exists(os.path.join(worker.__path__[0], 'tracing.py')))"
    probe = subprocess.run(
        [sys.executable, "-P", "-c", check],
        env=child_env(AMQP_URL, {"PYTHONPATH": str(base)}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    if probe.stdout.strip() != "False":
        raise SystemExit(f"{ref} ({commit}) already has worker/tracing.py: pick an older ref")
    return commit


def default_ref() -> str:
    found = subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True, text=True)
    return found.stdout.strip() or "HEAD~1"


def consumer(kind: str, model: Path, queue: str, args: argparse.Namespace, base: Path, endpoint: str) -> LoggedProcess:
    flags = ("--max-batch", str(args.max_batch), "--prefetch", str(args.window))
    command = worker_command(model, queue, *flags)
    env: dict[str, str] = {}
    if kind == "untraced":
        # -P: the working directory (this checkout) is not put on sys.path, so the old tree is imported.
        command.insert(1, "-P")
        env["PYTHONPATH"] = str(base)
    elif kind.startswith("on-"):
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
        if kind == "on-1%":
            env |= {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}
    process = LoggedProcess(command, env=child_env(AMQP_URL, env), name=f"{kind} worker")
    process.ready_event = "worker_started"
    return process


async def main(args: argparse.Namespace) -> None:
    tag = uuid.uuid4().hex[:6]
    queues = {kind: f"bench.trace.{i}.{tag}" for i, kind in enumerate(KINDS)}
    rng = np.random.default_rng(0)
    bodies = [
        encode_request({"x": rng.standard_normal((1, 256)).astype(np.float32)}, CONTENT_TYPE_MSGPACK)
        for _ in range(args.count)
    ]
    saturated: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS}  # msgs/s, CPU ms per request
    single: dict[str, list[float]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "untraced"
        commit = await asyncio.to_thread(prepare_untraced, args.baseline_ref, base)
        model = mlp_model(Path(tmp) / "mlp.onnx", width=256, hidden=256, layers=3)
        port = free_port()
        receiver = LoggedProcess(
            [sys.executable, "-m", "tests.support.otlp_receiver", "--port", str(port)],
            env=child_env(AMQP_URL),
            name="OTLP receiver",
            ready_event="ready",
        )
        endpoint = f"http://127.0.0.1:{port}"
        consumers = {k: consumer(k, model, queues[k], args, base, endpoint) for k in KINDS}
        try:
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(receiver)
                for kind in KINDS:
                    await stack.enter_async_context(consumers[kind])
                for kind in KINDS:  # warm-up
                    await drive(queues[kind], bodies[:300], content_type=CONTENT_TYPE_MSGPACK, window=args.window)
                for round_no in range(1, args.rounds + 1):
                    for kind in KINDS:
                        pid = consumers[kind].pid
                        assert pid is not None
                        before_s = cpu_s(pid)
                        r = await drive(queues[kind], bodies, content_type=CONTENT_TYPE_MSGPACK, window=args.window)
                        saturated[kind].append((r.msgs_per_s, (cpu_s(pid) - before_s) * 1000 / r.count))
                        one = await drive(
                            queues[kind], bodies[: args.single_count], content_type=CONTENT_TYPE_MSGPACK, window=1
                        )
                        single[kind].append(one.percentile_ms(50))
                    print(
                        f"round {round_no}/{args.rounds}: "
                        + ", ".join(f"{k} {saturated[k][-1][0]:.0f} msgs/s" for k in KINDS),
                        flush=True,
                    )
            exported = receiver.events("received")
        finally:
            await delete_queues(*queues.values())

    def med(kind: str, i: int) -> float:
        return statistics.median(v[i] for v in saturated[kind])

    print()
    print(
        f"{args.count} requests of FP32 [1, 256] with {args.window} in flight; {args.single_count} one at a time; "
        f"median of {args.rounds} rounds; untraced = {args.baseline_ref} ({commit})"
    )
    if exported:
        print(f"spans the OTLP receiver got: {exported[-1]['spans']}")
    print(f"{'worker':<9} {'msgs/s':>8} {'CPU ms/request':>15} {'1-in-flight p50 ms':>19}")
    for kind in KINDS:
        print(f"{kind:<9} {med(kind, 0):>8.0f} {med(kind, 1):>15.3f} {statistics.median(single[kind]):>19.3f}")
    print()
    for kind in KINDS[1:]:
        print(
            f"{kind:<8} / untraced: msgs/s {med(kind, 0) / med('untraced', 0):.3f}, "
            f"CPU per request {med(kind, 1) / med('untraced', 1):.3f}, "
            f"1-in-flight p50 {statistics.median(single[kind]) / statistics.median(single['untraced']):.3f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3000, help="requests per saturation run")
    parser.add_argument("--window", type=int, default=256, help="requests in flight at saturation (and prefetch)")
    parser.add_argument("--single-count", type=int, default=300, help="requests sent one at a time")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the four workers")
    parser.add_argument("--max-batch", type=int, default=64, help="worker --max-batch")
    parser.add_argument("--baseline-ref", default=default_ref(), help="git ref of the code without tracing")
    asyncio.run(main(parser.parse_args()))
