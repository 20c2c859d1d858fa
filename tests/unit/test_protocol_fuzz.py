"""Property tests: whatever bytes arrive, decoding and validation raise only ProtocolError, with short messages.

Bodies come from two sources, in both encodings: valid requests (made with ``encode_request``) whose bytes
are flipped, truncated, spliced and repeated; and structured random objects, shaped like requests or not,
encoded with msgspec. Each body goes through ``decode_request`` and ``decode_reply``; a request that decodes
goes through ``prepare`` of a tensor model (a tiny MLP) and of a text model, and what they accept is run.
Examples are derandomized, so every run (and CI) tries the same bodies; ``FUZZ_EXAMPLES=5000`` searches longer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from producer.wire.errors import ProtocolError
from producer.wire.names import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK
from producer.wire.protocol import DATATYPES, decode_reply, decode_request, encode_request
from tests.support.models import TEXT_WORDS, mlp_model, text_model_folder
from worker.pipelines.session import Pipeline
from worker.pipelines.tensor import TensorPipeline
from worker.pipelines.text import TextEmbeddingPipeline
from worker.settings import Settings

T = TypeVar("T")

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
"""Examples per property (``FUZZ_EXAMPLES`` for a longer search); derandomized, so a run is deterministic."""

MAX_ROWS = 4
MAX_MESSAGE_CHARS = 1500
"""Longest error message allowed: a few clipped fields plus the fixed text around them."""

ENCODINGS = [CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK]
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> list[Pipeline]:
    folder = tmp_path_factory.mktemp("fuzz")
    mlp = mlp_model(folder / "mlp.onnx", width=4, hidden=4, layers=1)
    text = text_model_folder(folder / "text")
    return [
        TensorPipeline.load(mlp, Settings(model=mlp).model_config),
        TextEmbeddingPipeline.load(text, Settings(model=text, max_text_bytes=64).model_config),
    ]


def attempt(call: Callable[[], T]) -> T | None:
    """``call()``, or None when it raised a ProtocolError (whose message must be short); anything else fails."""
    try:
        return call()
    except ProtocolError as e:
        error = e
    assert len(error.message) <= MAX_MESSAGE_CHARS, error.message[:300]
    return None


def check_body(body: bytes, content_type: str, pipelines: list[Pipeline]) -> None:
    """Decode, validate and (when accepted) run ``body``; anything but a short ProtocolError fails."""
    attempt(lambda: decode_reply(body, content_type))
    request = attempt(lambda: decode_request(body, content_type, default_id="fuzz"))
    if request is None:
        return
    for pipeline in pipelines:
        prepared = attempt(lambda p=pipeline: p.prepare(request, max_rows=MAX_ROWS))  # type: ignore[misc]
        if prepared is not None:
            [outputs] = pipeline.run([prepared])
            assert all(len(value) == request.rows for value in outputs.values())


# ---------------------------------------------------------------------------------------------
# Valid requests, then mutated

NAMES = st.sampled_from(["x", "text", "y", "", "\0", "é" * 3]) | st.text(max_size=8)
TEXTS = st.lists(
    st.sampled_from([*TEXT_WORDS, "", " ", "\ud800", "x" * 70, "é" * 33]) | st.text(max_size=12),
    min_size=0,
    max_size=5,
)


FLOAT_WIDTHS: dict[int, Literal[16, 32, 64]] = {2: 16, 4: 32, 8: 64}


@st.composite
def arrays(draw: st.DrawFn) -> Any:
    datatype = draw(st.sampled_from([d for d in DATATYPES if d != "BYTES"]))
    dtype = DATATYPES[datatype]
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    if dtype.kind == "f":
        elements = st.floats(width=FLOAT_WIDTHS[dtype.itemsize], allow_nan=True, allow_infinity=True)
        return draw(hnp.arrays(dtype, shape, elements=elements))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def valid_requests(draw: st.DrawFn) -> tuple[bytes, str]:
    content_type = draw(st.sampled_from(ENCODINGS))
    inputs: dict[str, Any] = {}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["text", "mlp", "array"]))
        if kind == "text":
            items = draw(TEXTS)
            inputs[draw(NAMES)] = np.array(items, dtype=object).reshape(len(items), 1) if draw(st.booleans()) else items
        elif kind == "mlp":  # what the tensor model takes, so some requests get through to a run
            inputs["x"] = draw(hnp.arrays(np.float32, (draw(st.integers(0, MAX_ROWS + 1)), 4)))
        else:
            inputs[draw(NAMES)] = draw(arrays())
    outputs = draw(st.none() | st.lists(st.sampled_from(["y", "embedding", "z"]), max_size=2))
    try:
        body = encode_request(inputs, content_type, request_id=draw(st.none() | st.text(max_size=8)), outputs=outputs)
    except (msgspec.EncodeError, UnicodeEncodeError):  # a lone surrogate cannot be encoded; mutations insert one
        body = encode_request({"x": np.zeros((1, 4), np.float32)}, content_type)
    return body, content_type


@st.composite
def mutated(draw: st.DrawFn, body: bytes) -> bytes:
    data = bytearray(body)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "repeat"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC1, 0xCF, 0xD3, 0xDD, 0xFF, ord("["), ord('"')]))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(max_size=16) | st.sampled_from([b"\xd4\x05\x00", b"[[[[", b"\\ud800", b"-1"]))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 32))] * draw(st.integers(1, 4))
    return bytes(data)


@FUZZ
@given(st.data())
def test_valid_requests_decode_and_validate_or_raise_protocol_errors(
    pipelines: list[Pipeline], data: st.DataObject
) -> None:
    body, content_type = data.draw(valid_requests())
    check_body(body, content_type, pipelines)


@FUZZ
@given(st.data())
def test_mutated_requests_raise_only_protocol_errors(pipelines: list[Pipeline], data: st.DataObject) -> None:
    body, content_type = data.draw(valid_requests())
    check_body(data.draw(mutated(body)), content_type, pipelines)


@FUZZ
@given(st.data())
def test_spliced_requests_raise_only_protocol_errors(pipelines: list[Pipeline], data: st.DataObject) -> None:
    first, content_type = data.draw(valid_requests())
    second, other_type = data.draw(valid_requests())
    cut_first = data.draw(st.integers(0, len(first)))
    cut_second = data.draw(st.integers(0, len(second)))
    content_type = data.draw(st.sampled_from([content_type, other_type]))
    check_body(first[:cut_first] + second[cut_second:], content_type, pipelines)


# ---------------------------------------------------------------------------------------------
# Structured random objects

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats()
    | st.text(max_size=10)
    | st.sampled_from(["NaN", "Infinity", "-Infinity", "BYTES", "FP32", "x", "text", "\ud800"])
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
MSGPACK_VALUES = st.recursive(
    SCALARS | st.binary(max_size=24) | st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=4)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
DATATYPE_NAMES = st.sampled_from([*DATATYPES, "FP99", "", "fp32"])
SHAPES = st.lists(st.sampled_from([0, 1, 2, 3, 4, -1, 2**31, 2**62, 2**63 - 1, -(2**63)]), max_size=5)


def tensors(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts shaped like request tensors, each field plausible or random."""
    return st.fixed_dictionaries(
        {},
        optional={
            "name": NAMES | values,
            "datatype": DATATYPE_NAMES | values,
            "shape": SHAPES | values,
            "data": st.lists(SCALARS, max_size=8) | st.lists(st.lists(SCALARS, max_size=3), max_size=3) | values,
            "parameters": values,
        },
    )


def requests_like(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.fixed_dictionaries(
            {"inputs": st.lists(tensors(values), max_size=3) | values},
            optional={
                "id": st.text(max_size=6) | values,
                "outputs": st.lists(st.fixed_dictionaries({"name": NAMES | values}), max_size=2) | values,
                "parameters": values,
                "model_name": st.text(max_size=4) | values,
                "error": st.fixed_dictionaries({"code": SCALARS, "message": SCALARS}) | values,
            },
        )
        | values
    )


def encode_json(value: Any) -> bytes:
    try:
        return msgspec.json.encode(value)
    except (msgspec.EncodeError, UnicodeEncodeError, OverflowError):  # what the encoder cannot write
        return msgspec.json.encode(None)


def encode_msgpack(value: Any) -> bytes:
    try:
        return msgspec.msgpack.encode(value)
    except (msgspec.EncodeError, UnicodeEncodeError, OverflowError):  # what the encoder cannot write
        return msgspec.msgpack.encode(None)


@FUZZ
@given(requests_like(JSON_VALUES))
def test_random_json_objects_raise_only_protocol_errors(pipelines: list[Pipeline], value: Any) -> None:
    check_body(encode_json(value), CONTENT_TYPE_JSON, pipelines)


@FUZZ
@given(requests_like(MSGPACK_VALUES))
def test_random_msgpack_objects_raise_only_protocol_errors(pipelines: list[Pipeline], value: Any) -> None:
    check_body(encode_msgpack(value), CONTENT_TYPE_MSGPACK, pipelines)


@FUZZ
@given(st.binary(max_size=64), st.sampled_from(ENCODINGS))
def test_random_bytes_raise_only_protocol_errors(pipelines: list[Pipeline], body: bytes, content_type: str) -> None:
    check_body(body, content_type, pipelines)


@pytest.mark.parametrize("content_type", ENCODINGS)
def test_the_fuzz_harness_accepts_a_valid_request(content_type: str, pipelines: list[Pipeline]) -> None:
    """The properties above would pass vacuously if nothing ever got through; this request does."""
    body = encode_request({"x": np.ones((2, 4), np.float32)}, content_type)
    request = decode_request(body, content_type)
    [outputs] = pipelines[0].run([pipelines[0].prepare(request, max_rows=MAX_ROWS)])
    assert outputs["y"].shape == (2, 4)
