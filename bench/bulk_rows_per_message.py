"""Bulk jobs: rows/s with one row per message vs several rows packed per message.

Runs ``producer bulk`` jobs (the :class:`producer.bulk.job.BulkJob` the CLI runs) of ``--rows`` small
rows through one worker process, once per ``--rows-per-message`` setting, round after round so
background load falls on every setting alike; each figure is the median over the rounds. Two
models: the tiny affine model (``x`` FP32 [N, 4] → ``y = 2x + 1``) and, when it is present, the
default text model (short sentences → ``embedding`` [N, 384]). Prints rows/s per setting and
the ratio of the best setting to one row per message.

Then the schedules (``--schedule-rows``, default text model): a bulk job of mixed-length texts (half
about 10 tokens, half about 60) at 64 rows per message, through two workers that differ only in
``--schedule``: ``rows`` (a request's texts batch with other requests' texts of similar length) and
``requests`` (each request rides whole in one run, padded to its longest text); and the same texts in
this process, with no broker (the worker's pipeline, grouped by length over the rows a job keeps in
flight): the ceiling. All three run batches of 64 rows, the smallest ``--max-batch`` that takes a
64-row request under ``--schedule requests``. Rounds alternate the three; prints medians and the
ratios rows ÷ requests (target >= 1.3) and rows ÷ in process (target >= 0.95).

Usage: python -m bench.bulk_rows_per_message [--rows 20000] [--rows-per-message 1,8,16,32,64]
       [--text-rows 20000] [--text-rows-per-message 1,32] [--rounds 1] [--max-in-flight 64]
       [--schedule-rows 4096] [--schedule-rounds 2]
(``--rows 0 --text-rows 0`` runs only the schedules; ``--schedule-rows 0`` skips them.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import structlog

from bench.driver import AMQP_URL, ROOT, delete_queues
from bench.text_inprocess import make_texts
from producer.bulk.job import BulkJob, BulkOptions
from producer.bulk.state import state_path
from producer.wire.names import results_queue
from producer.wire.protocol import InferRequest
from tests.support.models import affine_model
from tests.support.worker_process import WorkerProcess
from worker.pipelines.text import TextEmbeddingPipeline
from worker.pipelines.text_steps import group_by_length
from worker.settings import Settings

TEXT_MODEL = ROOT / "models" / "all-MiniLM-L6-v2"
WARM_UP_ROWS = 1000
WORDS = ["the", "a", "queue", "worker", "reply", "batch", "model", "fast", "slow", "broker", "message", "row"]


def write_tensor_rows(path: Path, rows: int) -> None:
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"r{i}", "inputs": {"x": [i, i + 0.5, -i, 1.0]}}) + "\n")


def write_text_rows(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(rows):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
            f.write(json.dumps({"id": f"t{i}", "text": text}) + "\n")


async def run_job(input_path: Path, queue: str, rows_per_message: int, max_in_flight: int) -> float:
    """One complete bulk job from scratch; returns rows/s."""
    output = input_path.with_suffix(f".out{rows_per_message}.jsonl")
    output.unlink(missing_ok=True)
    options = BulkOptions(
        input_path=input_path,
        output_path=output,
        queue=queue,
        job_id=f"bench-{uuid.uuid4().hex[:8]}",
        amqp_url=AMQP_URL,
        rows_per_message=rows_per_message,
        max_in_flight=max_in_flight,
    )
    try:
        summary = await BulkJob(options).run()
    finally:
        # A finished job keeps its results queue (for late replies) and its state file: not wanted here.
        await delete_queues(results_queue(options.resolved_job_id))
        state_path(output).unlink(missing_ok=True)
    if summary.failed_total:
        raise RuntimeError(f"{summary.failed_total} rows failed: {dict(summary.errors_by_code)}")
    output.unlink()
    return summary.rows_per_s


async def measure(
    label: str, model: Path, input_path: Path, settings: list[int], rounds: int, max_in_flight: int
) -> None:
    queue = f"bench.bulk.{uuid.uuid4().hex[:8]}"
    rates: dict[int, list[float]] = {n: [] for n in settings}
    try:
        async with WorkerProcess(AMQP_URL, model, queue, "--max-batch", "64"):
            warm_up = input_path.with_suffix(".warm-up.jsonl")
            with input_path.open() as source, warm_up.open("w") as head:
                head.writelines(line for _, line in zip(range(WARM_UP_ROWS), source, strict=False))
            await run_job(warm_up, queue, max(settings), max_in_flight)
            for _ in range(rounds):
                for n in settings:
                    rates[n].append(await run_job(input_path, queue, n, max_in_flight))
    finally:
        await delete_queues(queue)
    medians = {n: statistics.median(r) for n, r in rates.items()}
    base = medians.get(1)
    print(f"\n{label}: {sum(1 for _ in input_path.open()):,} rows, median of {rounds} round(s)")
    print(f"  {'rows/message':>12}  {'rows/s':>10}  {'vs 1/msg':>8}")
    for n, rate in medians.items():
        ratio = f"{rate / base:7.1f}x" if base else "       -"
        print(f"  {n:>12}  {rate:>10,.0f}  {ratio}")
    best = max(medians, key=lambda n: medians[n])
    if base:
        print(f"  best: {best} rows/message, {medians[best] / base:.1f}x the rows/s of 1 row/message")


def write_texts(path: Path, texts: list[str]) -> None:
    with path.open("w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"m{i}", "text": text}) + "\n")


def in_process_rows_per_s(pipeline: TextEmbeddingPipeline, texts: list[str], batch: int, window: int) -> float:
    """Embed ``texts`` as a worker would at its best, with no broker: tokenized, grouped by length over
    ``window`` rows at a time, ``batch`` rows per run; returns rows/s."""
    started = time.perf_counter()
    for start in range(0, len(texts), window):
        part = np.array(texts[start : start + window], dtype=object)
        prepared = pipeline.prepare(InferRequest(id="", inputs={"text": part}), max_rows=len(part))
        pieces = pipeline.pieces(prepared)
        for group in group_by_length([len(p.data.rows[0]) for p in pieces], batch):
            pipeline.run([pieces[i].data for i in group])
    return len(texts) / (time.perf_counter() - started)


async def measure_schedules(root: Path, rows: int, rounds: int, max_in_flight: int) -> None:
    """Row-level vs request-level scheduling on mixed-length texts at 64 rows per message, and in process."""
    rows_per_message = best = 64
    texts = make_texts(rows)
    input_path = root / "mixed.jsonl"
    write_texts(input_path, texts)
    pipeline = TextEmbeddingPipeline.load(TEXT_MODEL, Settings(model=TEXT_MODEL).model_config)
    pipeline.warm_up(best)
    window = max_in_flight * rows_per_message  # rows a job keeps in flight: the worker's batching window
    print(f"\nschedules: {rows:,} mixed-length texts, {rows_per_message} rows/message, batch {best}", flush=True)
    tag = uuid.uuid4().hex[:6]
    queues = {"rows": f"bench.rows.{tag}", "requests": f"bench.requests.{tag}"}
    e2e: dict[str, list[float]] = {k: [] for k in queues}
    inproc: list[float] = []
    warm_up = root / "mixed.warm-up.jsonl"
    write_texts(warm_up, texts[: rows_per_message * 8])
    try:
        async with contextlib.AsyncExitStack() as stack:
            for schedule, queue in queues.items():
                await stack.enter_async_context(
                    WorkerProcess(AMQP_URL, TEXT_MODEL, queue, "--max-batch", str(best), "--schedule", schedule)
                )
                await run_job(warm_up, queue, rows_per_message, max_in_flight)
            for round_no in range(1, rounds + 1):
                inproc.append(in_process_rows_per_s(pipeline, texts, best, window))
                for schedule, queue in queues.items():
                    e2e[schedule].append(await run_job(input_path, queue, rows_per_message, max_in_flight))
                print(
                    f"round {round_no}/{rounds}: in process {inproc[-1]:.0f} rows/s, "
                    + ", ".join(f"--schedule {k} {v[-1]:.0f} rows/s" for k, v in e2e.items()),
                    flush=True,
                )
    finally:
        await delete_queues(*queues.values())
    ceiling = statistics.median(inproc)
    by_rows, by_requests = statistics.median(e2e["rows"]), statistics.median(e2e["requests"])
    print(f"\ndefault text model, bulk job of {rows:,} mixed-length texts (half ~10, half ~60 tokens), "
          f"{rows_per_message} rows/message, batch {best}; median of {rounds} round(s)")  # fmt: skip
    print(f"  {'in process (no broker)':<34} {ceiling:>8,.0f} rows/s")
    print(f"  {'end to end, --schedule rows':<34} {by_rows:>8,.0f} rows/s")
    print(f"  {'end to end, --schedule requests':<34} {by_requests:>8,.0f} rows/s")
    print(f"  rows / requests:    {by_rows / by_requests:.2f}  (target >= 1.3)")
    print(f"  rows / in process:  {by_rows / ceiling:.2f}  (target >= 0.95)")


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--rows-per-message", type=_int_list, default=[1, 8, 16, 32, 64])
    parser.add_argument("--text-rows", type=int, default=20000, help="0 skips the text model")
    parser.add_argument("--text-rows-per-message", type=_int_list, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-in-flight", type=int, default=64)
    parser.add_argument("--schedule-rows", type=int, default=4096, help="0 skips the schedule comparison")
    parser.add_argument("--schedule-rounds", type=int, default=2)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.rows:
            tensor_input = root / "tensor.jsonl"
            write_tensor_rows(tensor_input, args.rows)
            model = affine_model(root / "affine.onnx")
            await measure(
                "tiny affine model", model, tensor_input, args.rows_per_message, args.rounds, args.max_in_flight
            )
        if args.text_rows and TEXT_MODEL.exists():
            text_input = root / "text.jsonl"
            write_text_rows(text_input, args.text_rows)
            await measure(
                "default text model",
                TEXT_MODEL,
                text_input,
                args.text_rows_per_message,
                args.rounds,
                args.max_in_flight,
            )
        elif args.text_rows:
            print(f"\ndefault text model: skipped, {TEXT_MODEL} is absent (make model)")
        if args.schedule_rows and TEXT_MODEL.exists():
            await measure_schedules(root, args.schedule_rows, args.schedule_rounds, args.max_in_flight)
        elif args.schedule_rows:
            print(f"\nschedules: skipped, {TEXT_MODEL} is absent (make model)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
