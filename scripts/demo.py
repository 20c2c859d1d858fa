"""The demo: a real model answering real requests through the broker.

Starts a worker on the default model (all-MiniLM-L6-v2 sentence embeddings), sends a few
sentences through RabbitMQ with the client library, prints their cosine similarities and the
per-stage timing the worker reported, then stops the worker (SIGTERM: it drains and exits).

Usage: python scripts/demo.py [--model models/all-MiniLM-L6-v2] [--queue demo]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from producer.client.rpc import Client
from producer.wire.names import DEFAULT_AMQP_URL
from worker.logs import configure_logging

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The queue holds requests until a worker takes them.",
    "Messages wait in the broker until a consumer is free.",
    "Il pleut sur la ville depuis ce matin.",
]


async def main(args: argparse.Namespace) -> int:
    console = Console()
    configure_logging(log_format="console", level="warning")
    url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    if not (args.model / "model.json").is_file():
        console.print(f"[red]no model at {args.model}[/]: build it with `make model`")
        return 1
    console.print(f"[bold]starting a worker[/] on {args.model} (queue {args.queue!r})")
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.cli", "run", "--model", str(args.model), "--queue", args.queue,
        "--http-port", "0", "--log-format", "json", "--log-level", "info",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "AMQP_URL": url},
    )  # fmt: skip
    assert worker.stderr is not None
    while b"worker_started" not in (line := await worker.stderr.readline()):
        if not line:
            console.print("[red]the worker exited before it was ready[/]")
            return 1
    console.print("worker ready: model warmed, consuming\n")
    try:
        async with Client(url, queue=args.queue, timeout_s=30) as client:
            # One request with every sentence as a row, and each sentence on its own, concurrently:
            # the worker batches the single-row requests together.
            together, *alone = await asyncio.gather(
                client.infer_text(SENTENCES), *(client.infer_text([s]) for s in SENTENCES)
            )
    finally:
        worker.terminate()
        _, stderr = await worker.communicate()
    vectors = together.outputs["embedding"]
    single = np.concatenate([r.outputs["embedding"] for r in alone])
    table = Table(title=f"cosine similarity ({together.model_name}, {vectors.shape[1]}-d embeddings)")
    table.add_column("sentence")
    for i in range(len(SENTENCES)):
        table.add_column(f"#{i + 1}", justify="right")
    similarity = vectors @ vectors.T
    for i, sentence in enumerate(SENTENCES):
        cells = [f"[bold green]{v:.2f}[/]" if v > 0.5 and i != j else f"{v:.2f}" for j, v in enumerate(similarity[i])]
        table.add_row(f"#{i + 1} {sentence}", *cells)
    console.print(table)
    timing = together.parameters.get("timing", {})
    console.print(
        f"\none request with {len(SENTENCES)} rows: broker {timing.get('broker_ms', 0):.1f} ms, "
        f"waiting for its batch {timing.get('batch_wait_ms', 0):.1f} ms, compute {timing.get('compute_ms', 0):.1f} ms "
        f"(batch of {timing.get('batch_rows')} rows)"
    )
    packed = max((r.parameters.get("coalesced", {"requests": 1, "rows": 1}) for r in alone), key=lambda c: c["rows"])
    batched = max(r.parameters.get("timing", {}).get("batch_requests", 1) for r in alone)
    agree = float(np.min(np.sum(single * vectors, axis=1)))
    console.print(
        f"{len(SENTENCES)} single-sentence calls made at the same time: the client packed up to {packed['requests']} "
        f"concurrent calls ({packed['rows']} rows) into one request, and up to {batched} requests shared one model "
        f"run; their embeddings match the multi-row request's (lowest cosine {agree:.6f})"
    )
    console.print(
        f"worker stopped (exit code {worker.returncode}): "
        + ("drained cleanly" if worker.returncode == 0 else stderr.decode(errors="replace")[-500:])
    )
    return 0 if worker.returncode == 0 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/all-MiniLM-L6-v2"), help="model folder")
    parser.add_argument("--queue", default="demo", help="request queue (default %(default)s)")
    sys.exit(asyncio.run(main(parser.parse_args())))
