"""Several consumer processes per pod: ``worker run --processes 2`` against ``--processes 1``, rows/s at saturation.

Both serve the broker-bound benchmark's small MLP (FP32 [rows, 256], three dense layers) from queues of their own
and are driven in turn, round after round, by the same client with ``--window`` requests in flight; each figure is
the median over the rounds. Prints rows/s of each and the ratio. On a machine where the broker and the client share
the cores with the workers, the ratio says how much a second process gains there, not what it gains on a GPU node
whose host has cores to spare.

Usage: python -m bench.processes [--count 3000] [--rows 1] [--window 512] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import tempfile
import uuid
from pathlib import Path

import numpy as np

from bench.driver import AMQP_URL, delete_queues, drive
from producer.wire.names import CONTENT_TYPE_MSGPACK
from producer.wire.protocol import encode_request
from tests.support.models import mlp_model
from tests.support.worker_process import WorkerProcess

KINDS = ("processes_1", "processes_2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main(args: argparse.Namespace) -> None:
    tag = uuid.uuid4().hex[:6]
    queues = {kind: f"bench.{kind}.{tag}" for kind in KINDS}
    rng = np.random.default_rng(0)
    bodies = [
        encode_request({"x": rng.standard_normal((args.rows, 256)).astype(np.float32)}, CONTENT_TYPE_MSGPACK)
        for _ in range(args.count)
    ]
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        model = mlp_model(Path(tmp) / "mlp.onnx", width=256, hidden=256, layers=3)
        flags = ("--max-batch", str(args.max_batch), "--prefetch", str(args.prefetch))
        workers = {
            kind: WorkerProcess(
                AMQP_URL, model, queues[kind], *flags, "--processes", kind[-1], http_port=_free_port(), name=kind
            )
            for kind in KINDS
        }
        try:
            async with contextlib.AsyncExitStack() as stack:
                for kind in KINDS:
                    await stack.enter_async_context(workers[kind])
                for kind in KINDS:  # warm-up
                    await drive(queues[kind], bodies[:500], content_type=CONTENT_TYPE_MSGPACK, window=args.window)
                for round_no in range(1, args.rounds + 1):
                    for kind in KINDS:
                        r = await drive(queues[kind], bodies, content_type=CONTENT_TYPE_MSGPACK, window=args.window)
                        rates[kind].append(r.msgs_per_s * args.rows)
                    print(
                        f"round {round_no}/{args.rounds}: "
                        + ", ".join(f"{k.replace('_', ' ')} {rates[k][-1]:.0f} rows/s" for k in KINDS),
                        flush=True,
                    )
                served = [await workers["processes_2"].metric_async("qinfer_requests_total", outcome="ok")]
        finally:
            await delete_queues(*queues.values())
    one, two = (statistics.median(rates[k]) for k in KINDS)
    print()
    print(
        f"{args.count} requests of FP32 [{args.rows}, 256], {args.window} in flight, median of {args.rounds} rounds"
        f" (--processes 2 answered {int(served[0])} requests in all, counted on its summed /metrics)"
    )
    print(f"--processes 1: {one:>9.0f} rows/s")
    print(f"--processes 2: {two:>9.0f} rows/s")
    print(f"rows/s, --processes 2 / --processes 1: {two / one:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3000, help="requests per run")
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--window", type=int, default=512, help="requests in flight")
    parser.add_argument("--prefetch", type=int, default=256, help="worker --prefetch (per process)")
    parser.add_argument("--max-batch", type=int, default=64, help="worker --max-batch")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over the two workers")
    asyncio.run(main(parser.parse_args()))
