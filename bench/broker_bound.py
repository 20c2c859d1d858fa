"""Broker-bound benchmark: a small MLP (FP32 [batch, 256], three dense layers), one row per message.

Starts three consumers, each on its own queue, and drives them with the same client:
  worker     this project's worker (batched, confirmed replies, batched acks)
  echo       a bare aio-pika echo consumer (reply = request body, ack after the confirm)
  unbatched  decode, run the model on one request, reply, ack
at saturation (``--window`` requests in flight) and with one request in flight. The consumers are
driven in turn, round after round, so background load falls on all of them alike; each figure is
the median over the rounds. At saturation it also reads each consumer process's CPU time (user +
system, from /proc) before and after the run: CPU per request is what one process costs the host,
whatever else shares the cores. Prints msgs/s, p50/p99 latency, CPU ms per request and the ratios
the worker is held to:
  saturation msgs/s: worker / echo       (target >= 1.0)
  CPU per request: worker / echo         (target <= 1.1)
  one in flight p50: worker / unbatched  (target <= 1.2)

Usage: python -m bench.broker_bound [--count 3000] [--window 256] [--single-count 1000] [--rounds 5]
       [--model mlp|affine]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np

from bench.driver import AMQP_URL, baseline, delete_queues, drive
from producer.wire.names import CONTENT_TYPE_MSGPACK
from producer.wire.protocol import encode_request
from tests.support.models import affine_model, mlp_model
from tests.support.worker_process import LoggedProcess, WorkerProcess, child_env, worker_command

KINDS = ("worker", "echo", "unbatched")
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime, stime (fields 14 and 15)


def worker_from_tree(tree: Path, model: Path, queue: str, *extra: str) -> LoggedProcess:
    """``worker run`` from another checkout of this project (an earlier commit), for a before/after ratio."""
    bootstrap = (
        f"import sys; sys.path.insert(0, {str(tree)!r}); from worker.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    command = [sys.executable, "-c", bootstrap, *worker_command(model, queue, *extra)[3:]]
    return LoggedProcess(command, env=child_env(AMQP_URL), name=f"worker from {tree}")


async def main(args: argparse.Namespace) -> None:
    tag = uuid.uuid4().hex[:6]
    kinds = (*KINDS, "before") if args.compare_tree else KINDS
    queues = {kind: f"bench.{kind}.{tag}" for kind in kinds}
    rng = np.random.default_rng(0)
    bodies = [
        encode_request({"x": rng.standard_normal((1, 256)).astype(np.float32)}, CONTENT_TYPE_MSGPACK)
        for _ in range(args.count)
    ]
    saturated: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in kinds}
    single: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        model = (
            affine_model(Path(tmp) / "affine.onnx", width=256)
            if args.model == "affine"
            else mlp_model(Path(tmp) / "mlp.onnx", width=256, hidden=256, layers=3)
        )
        consumers = {
            "worker": WorkerProcess(
                AMQP_URL,
                model,
                queues["worker"],
                *("--max-batch", str(args.max_batch), "--prefetch", str(args.window)),
                *args.worker_args.split(),
            ),
            "echo": baseline("echo", queues["echo"], prefetch=args.window),
            "unbatched": baseline("unbatched", queues["unbatched"], prefetch=args.window, model=model),
        }
        if args.compare_tree:
            consumers["before"] = worker_from_tree(
                args.compare_tree,
                model,
                queues["before"],
                "--max-batch",
                str(args.max_batch),
                "--prefetch",
                str(args.window),
            )
        try:
            async with contextlib.AsyncExitStack() as stack:
                for kind in kinds:
                    await stack.enter_async_context(consumers[kind])
                for kind in kinds:  # warm-up
                    await drive(queues[kind], bodies[:300], content_type=CONTENT_TYPE_MSGPACK, window=args.window)
                for round_no in range(1, args.rounds + 1):
                    for kind in kinds:
                        before_s = cpu_s(consumers[kind].pid)
                        r = await drive(queues[kind], bodies, content_type=CONTENT_TYPE_MSGPACK, window=args.window)
                        cpu_ms = (cpu_s(consumers[kind].pid) - before_s) * 1000 / args.count
                        saturated[kind].append((r.msgs_per_s, r.percentile_ms(50), r.percentile_ms(99), cpu_ms))
                        one = await drive(
                            queues[kind], bodies[: args.single_count], content_type=CONTENT_TYPE_MSGPACK, window=1
                        )
                        single[kind].append((one.percentile_ms(50), one.percentile_ms(99)))
                    print(
                        f"round {round_no}/{args.rounds}: "
                        + ", ".join(f"{k} {saturated[k][-1][0]:.0f} msgs/s" for k in kinds),
                        flush=True,
                    )
        finally:
            await delete_queues(*queues.values())

    def med(values: list[tuple[float, ...]], i: int) -> float:
        return statistics.median(v[i] for v in values)

    print()
    print(
        f"{args.count} requests of FP32 [1, 256] with {args.window} in flight; {args.single_count} one at a time;"
        f" median of {args.rounds} rounds"
    )
    print(
        f"{'consumer':<10} {'msgs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>11}"
        f" {'1-in-flight p50 ms':>19} {'p99 ms':>8}"
    )
    for kind in kinds:
        print(
            f"{kind:<10} {med(saturated[kind], 0):>9.0f} {med(saturated[kind], 1):>8.1f} "
            f"{med(saturated[kind], 2):>8.1f} {med(saturated[kind], 3):>11.3f}"
            f" {med(single[kind], 0):>19.3f} {med(single[kind], 1):>8.3f}"
        )
    print()
    print(
        f"saturation msgs/s, worker / echo:      {med(saturated['worker'], 0) / med(saturated['echo'], 0):.2f}"
        "  (target >= 1.0)"
    )
    print(f"saturation msgs/s, worker / unbatched: {med(saturated['worker'], 0) / med(saturated['unbatched'], 0):.2f}")
    print(
        f"CPU per request, worker / echo:        {med(saturated['worker'], 3) / med(saturated['echo'], 3):.2f}"
        "  (target <= 1.1)"
    )
    print(
        f"one in flight p50, worker / unbatched: {med(single['worker'], 0) / med(single['unbatched'], 0):.2f}"
        "  (target <= 1.2)"
    )
    if args.compare_tree:
        print(f"saturation msgs/s, worker / before:    {med(saturated['worker'], 0) / med(saturated['before'], 0):.2f}")
        print(f"CPU per request, worker / before:      {med(saturated['worker'], 3) / med(saturated['before'], 3):.2f}")
        print(f"one in flight p50, worker / before:    {med(single['worker'], 0) / med(single['before'], 0):.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3000, help="requests per saturation run")
    parser.add_argument("--window", type=int, default=256, help="requests in flight at saturation (and prefetch)")
    parser.add_argument("--single-count", type=int, default=1000, help="requests sent one at a time")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over the three consumers")
    parser.add_argument("--max-batch", type=int, default=64, help="worker --max-batch")
    parser.add_argument(
        "--model",
        choices=("mlp", "affine"),
        default="mlp",
        help="mlp: three dense layers; affine: y = 2x + 1, a near-zero model that leaves the host path alone",
    )
    parser.add_argument(
        "--compare-tree",
        type=Path,
        default=None,
        help="another checkout of this project (e.g. `git worktree add /tmp/before REV`): its worker runs as a "
        "fourth consumer, 'before', and the ratios to it are printed",
    )
    parser.add_argument("--worker-args", default="", help="more `worker run` flags, e.g. '--intra-op-threads 1'")
    asyncio.run(main(parser.parse_args()))
