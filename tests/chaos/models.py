"""Test models for the fault matrix (onnx.helper; dynamic first dimension)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
POISON_VALUE = 1000.0
"""Put this in column 0 of a row and :func:`poison_model` fails on the whole batch (ORT raises)."""


def poison_model(path: Path, width: int = 4) -> Path:
    """``y = 2 * x + 1``, plus a lookup that ONNX Runtime rejects for out-of-range data.

    ``z[i] = table[int(x[i, 0])]`` with a 16-entry table: any row whose first column is at least 16
    (e.g. :data:`POISON_VALUE`) makes Gather raise "indices element out of data bounds" for the
    whole batch, the way a real model fails on input it was never meant to see.
    """
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["x2"]),
            helper.make_node("Add", ["x2", "one"], ["y"]),
            helper.make_node("Gather", ["x", "zero"], ["col0"], axis=1),
            helper.make_node("Cast", ["col0"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["z"], axis=0),
        ],
        "poison",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N"]),
        ],
        initializer=[
            numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
            numpy_helper.from_array(np.arange(16, dtype=np.float32), "table"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path
