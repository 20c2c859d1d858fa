#!/usr/bin/env python3
"""In-process throughput of a text-embedding model: rows/s by batch size, with and without length grouping.

No broker: texts go through the worker's own text pipeline (tokenize -> pad to the batch's longest row ->
ONNX Runtime -> mean pool -> normalize) in this process. This is the ceiling the end-to-end benchmark through
RabbitMQ is compared with.

Texts: a realistic length mix, half short (about 10 tokens) and half long (about 60), shuffled so the two
kinds arrive interleaved. Without grouping, each batch takes the next ``batch`` texts in arrival order and
pads to its longest; with grouping, texts are taken ``--window`` at a time (the worker's batching window)
and split into batches of similar length with ``worker.pipelines.text_steps.group_by_length``.

Usage: ``python bench/text_inprocess.py [--model models/all-MiniLM-L6-v2] [--rows 512] [--batch-sizes 1,2,...]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from worker.pipelines.text_steps import TextPipeline, group_by_length, padded_tokens  # noqa: E402

VOCABULARY = (
    "the of and to in is was for on that with as by at from this it an be are or which his had not but have "
    "they all were one their has been its also more who first after new two time other some into over can "
    "only most made years such many would when city these may between world state where both during then well "
    "through them part so could while under three people later work school group system used known data queue "
    "worker model batch request reply service cluster message broker network memory engine music river season "
    "team film album game church village station company government university history"
)
WORDS = VOCABULARY.split()


def make_texts(count: int, *, seed: int = 7) -> list[str]:
    """``count`` texts: half of about 8 words (~10 tokens with specials), half of about 55 (~60 tokens)."""
    rng = random.Random(seed)
    texts = []
    for i in range(count):
        words = rng.randint(6, 10) if i % 2 == 0 else rng.randint(50, 60)
        sentence = " ".join(rng.choice(WORDS) for _ in range(words))
        texts.append(sentence.capitalize() + ".")
    rng.shuffle(texts)
    return texts


def batches_in_order(lengths: Sequence[int], batch: int) -> list[list[int]]:
    return [list(range(i, min(i + batch, len(lengths)))) for i in range(0, len(lengths), batch)]


def batches_grouped(lengths: Sequence[int], batch: int, window: int) -> list[list[int]]:
    groups: list[list[int]] = []
    for start in range(0, len(lengths), window):
        part = lengths[start : start + window]
        groups.extend([[start + i for i in g] for g in group_by_length(part, batch)])
    return groups


def run_once(
    pipeline: TextPipeline,
    run: Callable[[dict[str, Any]], Any],
    texts: Sequence[str],
    plan: Callable[[Sequence[int]], list[list[int]]],
) -> tuple[float, float, int]:
    """Embed ``texts`` batch by batch as ``plan`` groups them; returns (wall s, process CPU s, padded tokens)."""
    start_s, start_cpu_s = time.perf_counter(), time.process_time()
    rows = pipeline.tokenize(texts)
    lengths = [len(r) for r in rows]
    groups = plan(lengths)
    for group in groups:
        batch = pipeline.pad([rows[i] for i in group])
        pipeline.pool(run(pipeline.feeds(batch)), batch)
    return time.perf_counter() - start_s, time.process_time() - start_cpu_s, padded_tokens(lengths, groups)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "all-MiniLM-L6-v2", help="model folder")
    parser.add_argument("--rows", type=int, default=512, help="texts per measurement (default 512)")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128", help="comma-separated batch sizes")
    parser.add_argument("--window", type=int, default=256, help="rows grouped together by length (default 256)")
    parser.add_argument("--repeat", type=int, default=1, help="measurements per setting; the best counts")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    parser.add_argument(
        "--no-spin", action="store_true", help="ONNX Runtime threads sleep instead of spinning between runs"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.intra_op_threads
    if args.no_spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    pipeline = TextPipeline.from_folder(args.model)
    session = ort.InferenceSession(str(pipeline.manifest.model_path), options, providers=providers)
    pipeline = TextPipeline(
        pipeline.manifest,
        model_inputs=[i.name for i in session.get_inputs()],
        model_outputs=[o.name for o in session.get_outputs()],
    )
    output = [pipeline.hidden_state]

    def run(feeds: dict[str, Any]) -> Any:
        return session.run(output, feeds)[0]

    texts = make_texts(args.rows)
    lengths = [len(r) for r in pipeline.tokenize(texts)]
    short = [n for n in lengths if n < 30]
    long = [n for n in lengths if n >= 30]
    print(
        f"model {args.model} ({pipeline.manifest.precision}) on {session.get_providers()[0]}, "
        f"{os.cpu_count()} CPUs, intra-op threads {args.intra_op_threads or 'default'}"
        f"{', no spinning' if args.no_spin else ''}; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{args.rows} texts: {len(short)} short (mean {np.mean(short):.1f} tokens), "
        f"{len(long)} long (mean {np.mean(long):.1f} tokens); grouping window {args.window} rows"
    )
    run_once(pipeline, run, texts[:64], lambda n: batches_in_order(n, 16))  # warm-up

    results: list[dict[str, Any]] = []
    header = (
        f"{'batch':>5}  {'in order rows/s':>15}  {'grouped rows/s':>14}  {'speed-up':>8}  {'padded tokens':>13}"
        f"  {'CPU ms/row in order':>19}  {'grouped':>7}"
    )
    print(header)
    print("-" * len(header))
    for batch in batch_sizes:
        plans: dict[str, Callable[[Sequence[int]], list[list[int]]]] = {
            "in_order": lambda n, b=batch: batches_in_order(n, b),  # type: ignore[misc]
            "grouped": lambda n, b=batch: batches_grouped(n, b, args.window),  # type: ignore[misc]
        }
        row: dict[str, Any] = {"batch": batch}
        best_s = dict.fromkeys(plans, float("inf"))
        best_cpu_s = dict.fromkeys(plans, float("inf"))
        for _ in range(args.repeat):  # alternate the plans, so a noisy moment does not favour one
            for name, plan in plans.items():
                seconds, cpu_s, row[f"{name}_padded_tokens"] = run_once(pipeline, run, texts, plan)
                best_s[name] = min(best_s[name], seconds)
                best_cpu_s[name] = min(best_cpu_s[name], cpu_s)
        for name in plans:
            row[f"{name}_rows_per_s"] = args.rows / best_s[name]
            row[f"{name}_cpu_ms_per_row"] = 1000 * best_cpu_s[name] / args.rows
        results.append(row)
        print(
            f"{batch:>5}  {row['in_order_rows_per_s']:>15.1f}  {row['grouped_rows_per_s']:>14.1f}  "
            f"{row['grouped_rows_per_s'] / row['in_order_rows_per_s']:>7.2f}x  "
            f"{row['grouped_padded_tokens'] / row['in_order_padded_tokens']:>12.2f}x  "
            f"{row['in_order_cpu_ms_per_row']:>19.2f}  {row['grouped_cpu_ms_per_row']:>7.2f}"
        )
    best_grouped = max(results, key=lambda r: r["grouped_rows_per_s"])
    best_in_order = max(results, key=lambda r: r["in_order_rows_per_s"])
    print(
        f"best: grouped {best_grouped['grouped_rows_per_s']:.1f} rows/s at batch {best_grouped['batch']}; "
        f"in order {best_in_order['in_order_rows_per_s']:.1f} rows/s at batch {best_in_order['batch']}"
    )
    print("(best of --repeat runs; padded tokens: grouped / in order; CPU ms/row: process CPU time, all threads)")
    if args.json:
        summary = {
            "model": str(args.model),
            "rows": args.rows,
            "window": args.window,
            "device": session.get_providers()[0],
            "results": results,
            "best_batch": best_grouped["batch"],
            "best_rows_per_s": best_grouped["grouped_rows_per_s"],
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
