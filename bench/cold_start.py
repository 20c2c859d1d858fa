"""The worker's own part of a cold start, before and after, measured in one run (ratios).

For one model (default: MiniLM), in this process, repeated ``--repeats`` times, medians:

* **warm-up**: what the worker did before (the pipeline's warm-up twice: once to allocate and choose
  kernels, once timed to decide inline or model thread; a text model's warm-up a full batch of
  ``max_length``-token texts) against what it does now (``ModelRunner.warm_up``: one pass when the first
  is clearly too slow to run inline; on the CPU a text model warms one longest text and a full batch of
  short ones);
* **session**: creating the ONNX Runtime session as the worker does (``ORT_ENABLE_ALL`` graph
  optimizations at every start) against loading a model ORT optimized and saved once
  (``SessionOptions.optimized_model_filepath``), with optimizations off.

``worker coldstart`` measures the whole start (spawn to first reply) as a process.

Run: ``python -m bench.cold_start [MODEL] [--repeats 3] [--max-batch 64]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from worker.pipelines.tensor import load_pipeline, open_session
from worker.pipelines.text import TextEmbeddingPipeline, Tokenized
from worker.runner import ModelRunner
from worker.settings import DEFAULT_MODEL_PATH, Settings


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def old_warm_up(pipeline: object, max_rows: int) -> None:
    """The warm-up as it was: twice the pipeline's warm-up, a text model's at ``max_rows`` longest texts."""
    for _ in range(2):
        if isinstance(pipeline, TextEmbeddingPipeline):
            short = pipeline.text.tokenize(["warm up"])
            longest = pipeline.text.tokenize(["warm up " * pipeline.text.max_length])[0]
            for rows in (short, [longest] * max_rows):
                pipeline.run([Tokenized(rows, max(len(r) for r in rows))])
        else:
            pipeline.warm_up(max_rows)  # type: ignore[attr-defined]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, nargs="?", default=Path(DEFAULT_MODEL_PATH))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=64)
    args = parser.parse_args()
    settings = Settings(model=args.model, device="cpu", max_batch=args.max_batch, log_level="warning")
    onnx_file = args.model / "model.onnx" if args.model.is_dir() else args.model

    old_s, new_s = [], []
    for _ in range(args.repeats):
        pipeline = load_pipeline(settings.model_config)
        old_s.append(timed(lambda p=pipeline: old_warm_up(p, args.max_batch)))
        runner = ModelRunner()
        new_s.append(timed(lambda r=runner: asyncio.run(r.warm_up(settings, None))))
        new_s[-1] -= runner.load_s  # the runner loaded the model itself: count its warm-up only
        runner.shutdown()

    plain_s, cached_s = [], []
    with tempfile.TemporaryDirectory() as folder:
        optimized = os.path.join(folder, "optimized.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = optimized
        ort.InferenceSession(os.fspath(onnx_file), sess_options=options, providers=["CPUExecutionProvider"])
        for _ in range(args.repeats):
            plain_s.append(timed(lambda: open_session(onnx_file, settings.model_config)))
            cached = ort.SessionOptions()
            cached.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            cached.add_session_config_entry("session.intra_op.allow_spinning", "0")
            cached_s.append(
                timed(
                    lambda c=cached: ort.InferenceSession(optimized, sess_options=c, providers=["CPUExecutionProvider"])
                )
            )
    old, new = statistics.median(old_s), statistics.median(new_s)
    plain, cached = statistics.median(plain_s), statistics.median(cached_s)
    print(f"model {args.model}, --max-batch {args.max_batch}, CPU, median of {args.repeats}")
    print(f"warm-up: before {old:.3f} s, after {new:.3f} s: {old / new:.2f}x shorter")
    print(f"session: optimized at start {plain:.3f} s, optimized model loaded {cached:.3f} s: {plain / cached:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
