"""Client-side coalescing: many concurrent single-row ``infer`` callers, packed vs one request each.

Starts one worker on a small MLP (FP32 [batch, 256], three dense layers) and drives it with the
project's own :class:`producer.Client`, once with ``coalesce_rows=1`` (every call its own request)
and once with packing on, round after round so background load falls on both alike; each figure is
the median over the rounds. Closed loop: ``--callers`` tasks each call ``infer`` with one row, wait
for the reply, and call again, until ``--calls`` calls are answered. Also one caller alone (one call
in flight) for the latency packing must not cost. Checks every reply is its own caller's row.

Prints rows/s and latency, and the ratios the client is held to:
  rows/s, 256 callers: packed / unpacked       (target >= 5)
  p50, one call in flight: packed / unpacked   (target <= 1.1)

Usage: python -m bench.coalescing [--callers 256] [--calls 4000] [--single-calls 500] [--rounds 3]
       [--coalesce-rows 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import structlog

from bench.driver import AMQP_URL, delete_queues
from producer import Client
from producer.wire.names import dead_letter_queue
from tests.support.models import mlp_model
from tests.support.worker_process import WorkerProcess


async def closed_loop(client: Client, callers: int, calls: int, rows: list[np.ndarray]) -> tuple[float, list[float]]:
    """Rows/s and per-call latencies of ``callers`` tasks sharing ``client`` until ``calls`` are answered."""
    latencies: list[float] = []
    next_call = iter(range(calls))

    async def caller() -> None:
        for i in next_call:
            x = rows[i % len(rows)]
            started = time.perf_counter()
            reply = await client.infer({"x": x})
            latencies.append(time.perf_counter() - started)
            if reply.outputs["y"].shape != (1, 256):
                raise AssertionError(f"call {i} got outputs of shape {reply.outputs['y'].shape}")

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return calls / (time.perf_counter() - started), latencies


async def check_own_rows(client: Client, rows: list[np.ndarray], reference: Client) -> None:
    """Every caller gets exactly the reply its own row gets alone."""
    packed = await asyncio.gather(*(client.infer({"x": x}) for x in rows))
    alone = [await reference.infer({"x": x}) for x in rows[:32]]
    for got, want in zip(packed, alone, strict=False):
        np.testing.assert_allclose(got.outputs["y"], want.outputs["y"], rtol=1e-5, atol=1e-6)


async def main(args: argparse.Namespace) -> None:
    queue = f"bench.coalescing.{uuid.uuid4().hex[:6]}"
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((1, 256)).astype(np.float32) for _ in range(512)]
    settings = {"unpacked": 1, "packed": args.coalesce_rows}
    rates: dict[str, list[float]] = {k: [] for k in settings}
    p99_ms: dict[str, list[float]] = {k: [] for k in settings}
    single_p50_ms: dict[str, list[float]] = {k: [] for k in settings}
    with tempfile.TemporaryDirectory() as tmp:
        model = mlp_model(Path(tmp) / "mlp.onnx", width=256, hidden=256, layers=3)
        try:
            async with WorkerProcess(AMQP_URL, model, queue, "--prefetch", str(max(256, args.callers))):
                clients = {
                    kind: Client(AMQP_URL, queue=queue, timeout_s=60, coalesce_rows=n) for kind, n in settings.items()
                }
                for client in clients.values():
                    await client.connect()
                await check_own_rows(clients["packed"], rows[:256], clients["unpacked"])
                for client in clients.values():  # warm-up
                    await closed_loop(client, args.callers, min(1000, args.calls), rows)
                for round_no in range(1, args.rounds + 1):
                    for kind, client in clients.items():
                        rate, latencies = await closed_loop(client, args.callers, args.calls, rows)
                        rates[kind].append(rate)
                        p99_ms[kind].append(float(np.percentile(latencies, 99)) * 1000)
                        _, alone = await closed_loop(client, 1, args.single_calls, rows)
                        single_p50_ms[kind].append(float(np.percentile(alone, 50)) * 1000)
                    print(
                        f"round {round_no}/{args.rounds}: "
                        + ", ".join(f"{k} {rates[k][-1]:.0f} rows/s" for k in settings),
                        flush=True,
                    )
                for client in clients.values():
                    await client.close()
        finally:
            await delete_queues(queue, dead_letter_queue(queue))

    med = statistics.median
    print()
    print(
        f"{args.callers} concurrent callers, one FP32 [1, 256] row per call, {args.calls} calls per run;"
        f" one caller alone for {args.single_calls} calls; median of {args.rounds} rounds"
    )
    print(f"{'client':<24} {'rows/s':>9} {'p99 ms':>8} {'1-in-flight p50 ms':>19}")
    for kind, n in settings.items():
        label = f"{kind} (coalesce_rows={n})"
        print(f"{label:<24} {med(rates[kind]):>9.0f} {med(p99_ms[kind]):>8.1f} {med(single_p50_ms[kind]):>19.3f}")
    print()
    print(
        f"rows/s, {args.callers} callers: packed / unpacked     {med(rates['packed']) / med(rates['unpacked']):.2f}"
        "  (target >= 5)"
    )
    print(
        f"p50, one call in flight: packed / unpacked "
        f"{med(single_p50_ms['packed']) / med(single_p50_ms['unpacked']):.2f}  (target <= 1.1)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", type=int, default=256, help="concurrent callers")
    parser.add_argument("--calls", type=int, default=4000, help="calls per run")
    parser.add_argument("--single-calls", type=int, default=500, help="calls made by one caller alone")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over both clients")
    parser.add_argument("--coalesce-rows", type=int, default=64, help="coalesce_rows of the packed client")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # the clients' warnings only
    asyncio.run(main(parser.parse_args()))
