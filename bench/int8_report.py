#!/usr/bin/env python3
"""INT8 against FP32: embedding agreement, retrieval agreement and in-process CPU throughput.

Both models go through the worker's own text pipeline (tokenize -> ONNX Runtime -> mean pool ->
normalize) in this process, on CPU, with the same session options. What it prints:

* Cosine between the FP32 and INT8 embedding of each text of a fixed set (the retrieval corpus and its
  queries below, plus the build's reference texts): mean and worst.
* A small retrieval task: each query has one relevant document among the corpus's documents. For each
  model, recall@1 (the relevant document ranks first); between the models, top-1 agreement (same first
  document), mean overlap of the top 5, and mean Spearman correlation of the full rankings.
* Rows/s embedding ``--rows`` mixed-length texts in batches of ``--batch``, best of ``--repeat``, the two
  models measured alternately so a noisy moment does not favour one.

Usage: ``python -m bench.int8_report [--fp32 models/all-MiniLM-L6-v2] [--int8 models/all-MiniLM-L6-v2-int8]``
(build the INT8 model first: ``make model MODEL_FLAGS=--int8``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.text_inprocess import make_texts  # noqa: E402
from scripts.build_model import REFERENCE_TEXTS  # noqa: E402
from worker.pipelines.text_steps import TextPipeline  # noqa: E402

# (query, its relevant document). The other documents are the distractors of every query.
RETRIEVAL: tuple[tuple[str, str], ...] = (
    ("How do I reset my password?", "To change a forgotten password, open settings and choose 'reset password'."),
    ("What is the capital of France?", "Paris is the capital and largest city of France."),
    ("symptoms of the flu", "Influenza usually brings fever, cough, sore throat and muscle aches."),
    ("how to bake sourdough bread", "A sourdough loaf needs a lively starter, flour, water, salt and a long rise."),
    (
        "best time to visit Japan",
        "Spring cherry blossoms and autumn leaves make Japan most popular in April and November.",
    ),
    ("python list comprehension", "In Python, [x * 2 for x in items] builds a new list from an existing one."),
    ("why is the sky blue", "Air molecules scatter short blue wavelengths of sunlight more than red ones."),
    ("how do vaccines work", "A vaccine trains the immune system to recognise a pathogen without causing disease."),
    ("cheap flights to Spain", "Budget airlines offer low fares to Madrid, Barcelona and Malaga all year."),
    ("what does a GPU do", "A graphics processor runs thousands of arithmetic operations in parallel."),
    ("how to train a puppy", "Reward a young dog right after good behaviour and keep training sessions short."),
    ("causes of inflation", "Prices rise when demand outpaces supply or when money supply grows quickly."),
    ("how tall is Mount Everest", "Everest's summit stands about 8,849 metres above sea level."),
    ("learn to play guitar", "Beginners on the guitar start with open chords and simple strumming patterns."),
    ("what is a message queue", "A message broker stores messages until a consumer is ready to process them."),
    ("fix a leaking tap", "A dripping faucet usually needs a new washer or cartridge."),
    ("benefits of running", "Regular jogging strengthens the heart and improves mood and sleep."),
    ("how do solar panels work", "Photovoltaic cells turn sunlight into electric current."),
    ("who wrote Hamlet", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("how to save money", "Set a monthly budget, track spending and move savings automatically on payday."),
)
DISTRACTORS: tuple[str, ...] = (
    "The football season ends with a final in late May.",
    "The museum opens at nine and closes at six on weekdays.",
    "Tomatoes grow best in full sun with regular watering.",
    "The train to the airport leaves every fifteen minutes.",
    "Electric cars need fewer oil changes than petrol cars.",
    "The orchestra performed a symphony by Beethoven last night.",
    "Coffee beans are roasted to bring out their flavour.",
    "The library lends e-books as well as printed ones.",
    "Whales communicate with songs that travel far underwater.",
    "A new bridge across the river will open next year.",
)


def load(folder: Path, threads: int) -> tuple[TextPipeline, Callable[[dict[str, Any]], Any], str]:
    """The model's text pipeline, a function running its ONNX session, and its precision."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    base = TextPipeline.from_folder(folder)
    session = ort.InferenceSession(str(base.manifest.model_path), options, providers=["CPUExecutionProvider"])
    pipeline = TextPipeline(
        base.manifest,
        model_inputs=[i.name for i in session.get_inputs()],
        model_outputs=[o.name for o in session.get_outputs()],
    )
    output = [pipeline.hidden_state]
    return pipeline, lambda feeds: session.run(output, dict(feeds))[0], base.manifest.precision


def embed(model: tuple[TextPipeline, Callable[[dict[str, Any]], Any], str], texts: list[str], batch: int) -> Any:
    pipeline, run, _ = model
    return pipeline.embed(texts, run, max_rows=batch)


def ranks(scores: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Rank of each document per query row (0 = best)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    out = np.empty_like(order, dtype=np.float64)
    rows = np.arange(scores.shape[0])[:, None]
    out[rows, order] = np.arange(scores.shape[1])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--fp32", type=Path, default=ROOT / "models" / "all-MiniLM-L6-v2", help="FP32 model folder")
    parser.add_argument("--int8", type=Path, default=ROOT / "models" / "all-MiniLM-L6-v2-int8", help="INT8 folder")
    parser.add_argument("--rows", type=int, default=512, help="texts per throughput measurement (default 512)")
    parser.add_argument("--batch", type=int, default=32, help="rows per model run (default 32)")
    parser.add_argument("--repeat", type=int, default=3, help="throughput measurements per model; best counts")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    args = parser.parse_args(argv)
    for folder in (args.fp32, args.int8):
        if not (folder / "model.json").is_file():
            print(f"int8_report: no model in {folder}; build it with `make model` / `make model MODEL_FLAGS=--int8`")
            return 2

    import onnxruntime as ort

    fp32, int8 = load(args.fp32, args.intra_op_threads), load(args.int8, args.intra_op_threads)
    print(
        f"FP32 {args.fp32.name} vs INT8 {args.int8.name} ({int8[2]}), ONNX Runtime {ort.__version__} on CPU, "
        f"{os.cpu_count()} CPUs, intra-op threads {args.intra_op_threads or 'default'}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    queries = [q for q, _ in RETRIEVAL]
    documents = [d for _, d in RETRIEVAL] + list(DISTRACTORS)
    fixed = queries + documents + list(REFERENCE_TEXTS)
    a, b = embed(fp32, fixed, args.batch), embed(int8, fixed, args.batch)
    cosines = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    worst = int(np.argmin(cosines))
    print(
        f"embedding cosine FP32 vs INT8 over {len(fixed)} texts: mean {cosines.mean():.4f}, "
        f"worst {cosines[worst]:.4f} ({fixed[worst][:40]!r})"
    )

    n = len(queries)
    scores = {name: e[:n] @ e[n : n + len(documents)].T for name, e in (("fp32", a), ("int8", b))}
    rank = {name: ranks(s) for name, s in scores.items()}
    recall = {name: float(np.mean(r[np.arange(n), np.arange(n)] == 0)) for name, r in rank.items()}
    top1 = float(np.mean(np.argmax(scores["fp32"], axis=1) == np.argmax(scores["int8"], axis=1)))
    top5 = np.argsort(-scores["fp32"], axis=1)[:, :5], np.argsort(-scores["int8"], axis=1)[:, :5]
    overlap5 = float(np.mean([len(set(x) & set(y)) / 5 for x, y in zip(*top5, strict=True)]))
    d = rank["fp32"] - rank["int8"]
    m = len(documents)
    spearman = float(np.mean(1 - 6 * np.sum(d * d, axis=1) / (m * (m * m - 1))))
    print(
        f"retrieval, {n} queries x {m} documents: recall@1 FP32 {recall['fp32']:.2f}, INT8 {recall['int8']:.2f}; "
        f"top-1 agreement {top1:.2f}, top-5 overlap {overlap5:.2f}, Spearman {spearman:.3f}"
    )

    texts = make_texts(args.rows)
    embed(fp32, texts[:64], args.batch)  # warm-up
    embed(int8, texts[:64], args.batch)
    best_s = {"fp32": float("inf"), "int8": float("inf")}
    for _ in range(args.repeat):
        for name, model in (("fp32", fp32), ("int8", int8)):
            started = time.perf_counter()
            embed(model, texts, args.batch)
            best_s[name] = min(best_s[name], time.perf_counter() - started)
    rate = {name: args.rows / s for name, s in best_s.items()}
    print(
        f"throughput, {args.rows} mixed-length texts in batches of {args.batch}: FP32 {rate['fp32']:,.0f} rows/s, "
        f"INT8 {rate['int8']:,.0f} rows/s (INT8/FP32 {rate['int8'] / rate['fp32']:.2f}x)"
    )
    sizes = {
        name: (folder / "model.onnx").stat().st_size / 1e6
        for name, folder in (("fp32", args.fp32), ("int8", args.int8))
    }
    print(f"model file: FP32 {sizes['fp32']:.1f} MB, INT8 {sizes['int8']:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
