"""Rows-per-message benchmark: a tiny model fed 64 rows per message, end to end vs in process.

The model is the small MLP of the broker-bound benchmark (FP32 [rows, 256], three dense layers).
In each round, in turn:
  in-process   ONNX Runtime in this process, no broker, at each batch size of ``--batch-sizes``
               (including msgpack decoding of the requests and encoding of the replies, as the worker
               must); the best batch size is the ceiling
  worker       ``worker run`` saturated through RabbitMQ with ``--rows`` rows per message
  echo         a bare aio-pika echo consumer on the same messages: what the broker and the client
               allow at this message size, with no model at all
Prints rows/s (median over rounds) and the ratios worker / in-process best (target >= 0.5) and
worker / echo (how much of what the broker allows the worker delivers).

Usage: python -m bench.rows_per_message [--rows 64] [--count 1500] [--window 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.driver import AMQP_URL, baseline, delete_queues, drive
from producer.wire.names import CONTENT_TYPE_MSGPACK
from producer.wire.protocol import decode_request, encode_reply, encode_request
from tests.support.models import mlp_model
from tests.support.worker_process import WorkerProcess


def in_process_rows_per_s(session: ort.InferenceSession, bodies: list[bytes], rows: int, batch: int) -> float:
    """Decode, run ``batch`` rows at a time, encode one reply per request; return rows/s."""
    per_run = max(1, batch // rows)
    started = time.perf_counter()
    for start in range(0, len(bodies), per_run):
        requests = [decode_request(b, CONTENT_TYPE_MSGPACK) for b in bodies[start : start + per_run]]
        x = np.concatenate([r.inputs["x"] for r in requests])
        (y,) = session.run(["y"], {"x": x})
        for i, r in enumerate(requests):
            encode_reply(r.id, {"y": y[i * rows : (i + 1) * rows]}, CONTENT_TYPE_MSGPACK, model_name="mlp")
    return len(bodies) * rows / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    bodies = [
        encode_request({"x": rng.standard_normal((args.rows, 256)).astype(np.float32)}, CONTENT_TYPE_MSGPACK)
        for _ in range(args.count)
    ]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    tag = uuid.uuid4().hex[:6]
    queue, echo_queue = f"bench.rows.{tag}", f"bench.rows-echo.{tag}"
    inproc: dict[int, list[float]] = {b: [] for b in sizes}
    e2e: list[float] = []
    echo: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = mlp_model(Path(tmp) / "mlp.onnx", width=256, hidden=256, layers=3)
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        worker_consumer = WorkerProcess(
            AMQP_URL, model, queue, *("--max-batch", str(args.max_batch), "--prefetch", str(args.window))
        )
        echo_consumer = baseline("echo", echo_queue, prefetch=args.window)
        try:
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(worker_consumer)
                await stack.enter_async_context(echo_consumer)
                for q in (queue, echo_queue):
                    await drive(q, bodies[:200], content_type=CONTENT_TYPE_MSGPACK, window=args.window)
                for round_no in range(1, args.rounds + 1):
                    for b in sizes:
                        inproc[b].append(in_process_rows_per_s(session, bodies, args.rows, b))
                    r = await drive(queue, bodies, content_type=CONTENT_TYPE_MSGPACK, window=args.window)
                    e2e.append(r.count * args.rows / r.elapsed_s)
                    r = await drive(echo_queue, bodies, content_type=CONTENT_TYPE_MSGPACK, window=args.window)
                    echo.append(r.count * args.rows / r.elapsed_s)
                    best = max(sizes, key=lambda b: inproc[b][-1])
                    print(
                        f"round {round_no}/{args.rounds}: in-process best {inproc[best][-1]:.0f} rows/s "
                        f"(batch {best}), worker {e2e[-1]:.0f} rows/s, echo {echo[-1]:.0f} rows/s",
                        flush=True,
                    )
        finally:
            await delete_queues(queue, echo_queue)
    med = {b: statistics.median(v) for b, v in inproc.items()}
    best = max(med, key=lambda b: med[b])
    worker = statistics.median(e2e)
    echo_rows = statistics.median(echo)
    print()
    print(f"{args.count} messages of {args.rows} rows (FP32 [{args.rows}, 256]); median of {args.rounds} rounds")
    print("in-process rows/s by batch size: " + ", ".join(f"{b}: {v:.0f}" for b, v in med.items()))
    print(f"end to end, worker: {worker:.0f} rows/s ({worker / args.rows:.0f} msgs/s)")
    print(f"end to end, echo:   {echo_rows:.0f} rows/s ({echo_rows / args.rows:.0f} msgs/s), no model")
    print()
    print(f"worker / in-process best (batch {best}): {worker / med[best]:.2f}  (target >= 0.5)")
    print(f"worker / echo:                          {worker / echo_rows:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="rows per message")
    parser.add_argument("--count", type=int, default=1500, help="messages per run")
    parser.add_argument("--window", type=int, default=64, help="messages in flight (and worker prefetch)")
    parser.add_argument("--max-batch", type=int, default=256, help="worker --max-batch (rows)")
    parser.add_argument("--batch-sizes", default="64,128,256", help="in-process batch sizes (rows) to try")
    parser.add_argument("--rounds", type=int, default=3, help="rounds")
    sys.exit(asyncio.run(main(parser.parse_args())))
