"""GPU benchmark: in-process rows/s by batch size of the default text model's variants, ready for a GPU machine.

Runs each variant that is built (FP32 ``models/all-MiniLM-L6-v2``; ONNX Runtime's transformer-optimized ``-opt`` and
``-fp16``: ``make model MODEL_FLAGS=--optimize`` / ``--fp16``) on the device, in this process (no broker), on the
same synthetic texts ``worker calibrate`` uses (half short, half long), at each batch size, and prints rows/s, the
best batch of each variant and each variant's best against FP32's best. One call on a GPU node:

    python -m bench.gpu                       # --device cuda: fails at once, saying why, without a usable GPU
    python -m bench.gpu --device cpu --batch-sizes 1,8 --seconds-per-size 0.5    # the same table on the CPU

Usage: python -m bench.gpu [--model DIR] [--device cuda|cpu] [--batch-sizes 1,2,...] [--seconds-per-size 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker.calibrate import measure
from worker.errors import ModelLoadError
from worker.gpu_check import precision
from worker.pipelines.tensor import load_pipeline
from worker.settings import DEFAULT_MODEL_PATH, Settings

VARIANTS = ("", "-opt", "-fp16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(DEFAULT_MODEL_PATH), help="the FP32 model folder")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where the variants run")
    parser.add_argument("--batch-sizes", default="1,8,16,32,64,128,256", help="rows per run to try")
    parser.add_argument("--seconds-per-size", type=float, default=2.0, help="measuring time per batch size")
    args = parser.parse_args(argv)
    sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    results: dict[str, dict[int, float]] = {}
    for suffix in VARIANTS:
        folder = args.model.with_name(args.model.name + suffix)
        if not folder.exists():
            flag = {"-opt": "--optimize", "-fp16": "--fp16"}.get(suffix, "")
            print(f"{folder.name}: not built (make model MODEL_FLAGS={flag}); skipped", flush=True)
            continue
        try:
            pipeline = load_pipeline(Settings(model=folder, device=args.device).model_config)
        except ModelLoadError as e:
            print(f"{folder.name}: {e}", file=sys.stderr)
            return 2
        label = f"{folder.name} ({precision(folder)})"
        print(f"{label} on {', '.join(pipeline.providers)}", flush=True)
        results[label] = measure(
            pipeline,
            sizes,
            seconds_per_size=args.seconds_per_size,
            progress=lambda b, r: print(f"  batch {b:>5}: {r:>10.1f} rows/s", flush=True),
        )
    if not results:
        return 2
    print()
    print(f"{'variant':<34}" + "".join(f"{b:>10}" for b in sizes) + f"{'best':>10}{'vs FP32':>9}")
    base = max(next(iter(results.values())).values())
    for label, rates in results.items():
        best_batch = max(rates, key=lambda b: rates[b])
        cells = "".join(f"{rates[b]:>10.0f}" for b in sizes)
        print(f"{label:<34}{cells}{best_batch:>10}{max(rates.values()) / base:>9.2f}")
    print(f"\nrows/s in process on {args.device}; texts: half 6-10 words, half 40-60 words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
