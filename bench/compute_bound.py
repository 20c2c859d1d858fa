"""Compute-bound benchmark: the default text model end to end through the broker vs in process.

Texts have a realistic length mix (half about 10 tokens, half about 60), one text per message.
In each round, in turn:
  in-process   the worker's own text pipeline and ONNX Runtime session in this process, no broker,
               grouped by length within a window, at the best of ``--batch-sizes`` (found first;
               the workers run with that --max-batch): the ceiling
  worker       ``worker run`` on the model, saturated through RabbitMQ (``--window`` in flight)
  ungrouped    the same worker with --no-group-by-length (texts batched in arrival order)
Prints rows/s (median over rounds) and the ratios:
  worker / in-process best       (target >= 0.95)
  worker / ungrouped             (what grouping by length buys end to end)

Usage: python -m bench.compute_bound [--count 1536] [--window 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from bench.driver import AMQP_URL, delete_queues, drive
from bench.text_inprocess import make_texts
from producer.wire.names import CONTENT_TYPE_MSGPACK
from producer.wire.protocol import InferRequest, encode_request
from tests.support.worker_process import WorkerProcess
from worker.pipelines.text import TextEmbeddingPipeline
from worker.pipelines.text_steps import group_by_length
from worker.settings import Settings


def in_process_rows_per_s(pipeline: TextEmbeddingPipeline, texts: list[str], batch: int, window: int) -> float:
    """Embed ``texts`` the way the worker would, batch by batch, with no broker; return rows/s."""
    started = time.perf_counter()
    for start in range(0, len(texts), window):
        part = texts[start : start + window]
        prepared = [
            pipeline.prepare(InferRequest(id="", inputs={"text": np.array([t], dtype=object)}), max_rows=batch)
            for t in part
        ]
        for group in group_by_length([p.longest for p in prepared], batch):
            pipeline.run([prepared[i] for i in group])
    return len(texts) / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    model = Path(args.model)
    texts = make_texts(args.count)
    bodies = [encode_request({"text": [t]}, CONTENT_TYPE_MSGPACK) for t in texts]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    pipeline = TextEmbeddingPipeline.load(model, Settings(model=model).model_config)
    pipeline.warm_up(max(sizes))
    # The worker runs at the in-process best batch size, so both sides compute the same batches.
    sweep = {b: in_process_rows_per_s(pipeline, texts, b, args.window) for b in sizes}
    best = max(sweep, key=lambda b: sweep[b])
    print("in-process rows/s by batch size: " + ", ".join(f"{b}: {v:.0f}" for b, v in sweep.items()), flush=True)
    print(f"workers run with --max-batch {best}", flush=True)
    tag = uuid.uuid4().hex[:6]
    queues = {"worker": f"bench.text.{tag}", "ungrouped": f"bench.text-ungrouped.{tag}"}
    inproc: list[float] = []
    e2e: dict[str, list[float]] = {k: [] for k in queues}
    common = ["--max-batch", str(best), "--prefetch", str(args.window)]
    workers = [
        WorkerProcess(AMQP_URL, model, queues["worker"], *common),
        WorkerProcess(AMQP_URL, model, queues["ungrouped"], *common, "--no-group-by-length"),
    ]
    try:
        async with contextlib.AsyncExitStack() as stack:
            for process in workers:
                await stack.enter_async_context(process)
            for queue in queues.values():  # warm-up
                await drive(queue, bodies[:128], content_type=CONTENT_TYPE_MSGPACK, window=args.window)
            for round_no in range(1, args.rounds + 1):
                inproc.append(in_process_rows_per_s(pipeline, texts, best, args.window))
                for kind, queue in queues.items():
                    r = await drive(queue, bodies, content_type=CONTENT_TYPE_MSGPACK, window=args.window)
                    e2e[kind].append(r.msgs_per_s)
                print(
                    f"round {round_no}/{args.rounds}: in-process {inproc[-1]:.0f} rows/s, "
                    + ", ".join(f"{k} {v[-1]:.0f} rows/s" for k, v in e2e.items()),
                    flush=True,
                )
    finally:
        await delete_queues(*queues.values())
    ceiling = statistics.median(inproc)
    worker, ungrouped = statistics.median(e2e["worker"]), statistics.median(e2e["ungrouped"])
    print()
    print(f"{args.count} texts (half ~10, half ~60 tokens), one per message; batch {best}; "
          f"median of {args.rounds} rounds")  # fmt: skip
    print(f"{'in process (no broker)':<34} {ceiling:>8.0f} rows/s")
    print(f"{'end to end, grouped by length':<34} {worker:>8.0f} rows/s")
    print(f"{'end to end, arrival order':<34} {ungrouped:>8.0f} rows/s")
    print()
    print(f"worker / in-process (batch {best}):  {worker / ceiling:.2f}  (target >= 0.95)")
    print(f"grouped / ungrouped, end to end:    {worker / ungrouped:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/all-MiniLM-L6-v2", help="text model folder")
    parser.add_argument("--count", type=int, default=1536, help="texts per run")
    parser.add_argument("--window", type=int, default=256, help="requests in flight (and worker prefetch)")
    parser.add_argument("--batch-sizes", default="8,16,32,64", help="batch sizes to try in process")
    parser.add_argument("--rounds", type=int, default=2, help="rounds")
    sys.exit(asyncio.run(main(parser.parse_args())))
