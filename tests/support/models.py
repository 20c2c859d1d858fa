"""Small ONNX models built with onnx.helper for the tests (dynamic first dimension)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers, processors

OPSET = 17


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def affine_model(path: Path, width: int = 4) -> Path:
    """``y = 2 * x + 1``: input ``x`` FP32 [N, width] → output ``y`` FP32 [N, width]."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["x2"]),
            helper.make_node("Add", ["x2", "one"], ["y"]),
        ],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        initializer=[
            numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        ],
    )
    return _save(graph, path)


def mlp_model(path: Path, width: int = 256, hidden: int = 256, layers: int = 3, seed: int = 0) -> Path:
    """A small MLP: ``x`` FP32 [N, width] → ``y`` FP32 [N, hidden] through ``layers`` dense+ReLU layers."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current, dim = "x", width
    for i in range(layers):
        w = (rng.standard_normal((dim, hidden)) / np.sqrt(dim)).astype(np.float32)
        b = (rng.standard_normal(hidden) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"h{i}"]),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}" if i < layers - 1 else "y"]),
        ]
        current, dim = f"r{i}", hidden
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", hidden])],
        initializer=inits,
    )
    return _save(graph, path)


def two_io_model(path: Path) -> Path:
    """Two inputs and two outputs of different dtypes.

    ``a`` FP32 [N, 3], ``b`` INT64 [N, 2] → ``sum_a`` FP32 [N, 1] (row sums of a),
    ``b_plus`` INT64 [N, 2] (b + 10).
    """
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["a", "axes"], ["sum_a"], keepdims=1),
            helper.make_node("Add", ["b", "ten"], ["b_plus"]),
        ],
        "two_io",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["N", 2]),
        ],
        [
            helper.make_tensor_value_info("sum_a", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("b_plus", TensorProto.INT64, ["N", 2]),
        ],
        initializer=[
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
            numpy_helper.from_array(np.array(10, dtype=np.int64), "ten"),
        ],
    )
    return _save(graph, path)


TEXT_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "café", "東京"]
"""The vocabulary of :func:`make_tokenizer` (after [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3)."""


def make_tokenizer(path: Path) -> None:
    """A word-level tokenizer with BERT's special tokens, saved with fixed padding to 16 and truncation at 8."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3} | {w: i + 4 for i, w in enumerate(TEXT_WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=16)
    tokenizer.enable_truncation(max_length=8)
    tokenizer.save(str(path))


def text_model_folder(folder: Path, *, dim: int = 4, max_length: int = 12) -> Path:
    """A tiny text-embedding model folder: :func:`make_tokenizer`, a manifest, and an ONNX model whose
    hidden state is a lookup of each token id (``input_ids`` int64 [N, T] -> ``last_hidden_state`` FP32
    [N, T, dim]), so a row's embedding does not depend on its batch's padding."""
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder / "tokenizer.json")
    vocab = 4 + len(TEXT_WORDS)
    table = (np.arange(vocab * dim, dtype=np.float32).reshape(vocab, dim) % 7) - 3
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["N", "T", dim])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    _save(graph, folder / "model.onnx")
    manifest = {
        "format": 1,
        "pipeline": "text-embedding",
        "name": "tiny-text",
        "max_length": max_length,
        "max_positions": 64,
        "dim": dim,
    }
    (folder / "model.json").write_text(json.dumps(manifest))
    return folder
