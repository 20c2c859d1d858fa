"""Wire contract: round trips in both encodings, OIP JSON as clients send it, clear errors."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest

from producer.wire.errors import CLIP_CHARS, ProtocolError, clip
from producer.wire.names import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK
from producer.wire.protocol import (
    DATATYPES,
    ErrorCode,
    ErrorReply,
    InferReply,
    decode_reply,
    decode_request,
    encode_error,
    encode_reply,
    encode_request,
)

ENCODINGS = [CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK]
NUMERIC = [name for name in DATATYPES if name != "BYTES"]


def _sample(datatype: str) -> np.ndarray:
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if dtype.kind == "f":
        return np.array([[0.5, -1.25, 3.0], [1e3, 0.0, -7.5]], dtype=dtype)
    info = np.iinfo(dtype)
    return np.array([[info.min, 0, info.max], [1, 2, 3]], dtype=dtype)


@pytest.mark.parametrize("content_type", ENCODINGS)
@pytest.mark.parametrize("datatype", NUMERIC)
def test_request_round_trips_every_numeric_datatype(content_type: str, datatype: str) -> None:
    arr = _sample(datatype)
    body = encode_request({"x": arr}, content_type, request_id="r1")
    request = decode_request(body, content_type)
    assert request.id == "r1"
    assert request.rows == 2
    assert request.inputs["x"].dtype == DATATYPES[datatype]
    np.testing.assert_array_equal(request.inputs["x"], arr)


@pytest.mark.parametrize("content_type", ENCODINGS)
def test_bytes_tensors_round_trip_as_strings(content_type: str) -> None:
    texts = ["hello", "", "naïve café ☕"]
    request = decode_request(encode_request({"text": texts}, content_type), content_type, default_id="cid")
    assert request.id == "cid"
    assert list(request.inputs["text"]) == texts


@pytest.mark.parametrize("content_type", ENCODINGS)
def test_reply_round_trips_with_parameters(content_type: str) -> None:
    outputs = {"y": np.arange(6, dtype=np.float32).reshape(3, 2), "n": np.array([1, 2, 3], dtype=np.int64)}
    body = encode_reply("r9", outputs, content_type, model_name="m", model_version="2", parameters={"a": 1})
    reply = decode_reply(body, content_type)
    assert isinstance(reply, InferReply)
    assert (reply.id, reply.model_name, reply.model_version, reply.parameters) == ("r9", "m", "2", {"a": 1})
    for name, value in outputs.items():
        np.testing.assert_array_equal(reply.outputs[name], value)
        assert reply.outputs[name].dtype == value.dtype


@pytest.mark.parametrize("content_type", ENCODINGS)
def test_error_reply_round_trips(content_type: str) -> None:
    reply = decode_reply(encode_error("r1", ErrorCode.WRONG_SHAPE, "bad", content_type), content_type)
    assert reply == ErrorReply(id="r1", code="wrong_shape", message="bad")


def test_kserve_json_body_is_accepted_as_sent() -> None:
    # What a KServe V2 / Triton HTTP client sends, including nested data, outputs and parameters.
    body = json.dumps(
        {
            "id": "42",
            "inputs": [
                {"name": "INPUT0", "shape": [2, 2], "datatype": "FP32", "data": [[1.0, 2.0], [3.0, 4.0]]},
                {"name": "INPUT1", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4], "parameters": {}},
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": False}}],
            "parameters": {"priority": 1},
        }
    ).encode()
    request = decode_request(body, CONTENT_TYPE_JSON)
    assert request.id == "42"
    assert request.outputs == ["OUTPUT0"]
    assert request.parameters == {"priority": 1}
    np.testing.assert_array_equal(request.inputs["INPUT0"], [[1, 2], [3, 4]])
    assert request.inputs["INPUT1"].dtype == np.int64


def test_json_reply_is_plain_oip_json() -> None:
    body = encode_reply("1", {"y": np.array([[1.5, 2.0]], dtype=np.float32)}, CONTENT_TYPE_JSON, model_name="m")
    assert json.loads(body) == {
        "id": "1",
        "model_name": "m",
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1.5, 2.0]}],
    }


@pytest.mark.parametrize(
    ("body", "content_type", "code"),
    [
        (b"not json", CONTENT_TYPE_JSON, ErrorCode.BAD_ENCODING),
        (b'{"inputs": []}', CONTENT_TYPE_JSON, ErrorCode.BAD_ENCODING),
        (b'{"id": 1, "inputs": 3}', CONTENT_TYPE_JSON, ErrorCode.BAD_ENCODING),
        (b"\xc1", CONTENT_TYPE_MSGPACK, ErrorCode.BAD_ENCODING),
        (b"{}", "text/plain", ErrorCode.UNSUPPORTED_CONTENT_TYPE),
        (b"{}", None, ErrorCode.UNSUPPORTED_CONTENT_TYPE),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]}',
            CONTENT_TYPE_JSON,
            ErrorCode.INVALID_TENSOR,
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}]}',
            CONTENT_TYPE_JSON,
            ErrorCode.INVALID_TENSOR,
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}]}',
            CONTENT_TYPE_JSON,
            ErrorCode.INVALID_TENSOR,
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [1]}]}',
            CONTENT_TYPE_JSON,
            ErrorCode.INVALID_TENSOR,
        ),
        (
            b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1, 2]},'
            b'{"name": "b", "datatype": "FP32", "shape": [1], "data": [1]}]}',
            CONTENT_TYPE_JSON,
            ErrorCode.WRONG_SHAPE,
        ),
    ],
)
def test_malformed_requests_raise_protocol_errors_with_stable_codes(
    body: bytes, content_type: str | None, code: ErrorCode
) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_request(body, content_type)
    assert caught.value.code == code
    assert caught.value.message


def test_msgpack_data_length_must_match_shape() -> None:
    body = msgspec.msgpack.encode(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": b"\x00" * 12}]}
    )
    with pytest.raises(ProtocolError, match="needs 16"):
        decode_request(body, CONTENT_TYPE_MSGPACK)


def test_msgpack_numeric_data_travels_as_raw_little_endian_bytes() -> None:
    arr = np.array([[1.0, 2.0]], dtype=np.float32)
    wire = msgspec.msgpack.decode(encode_request({"x": arr}, CONTENT_TYPE_MSGPACK))
    assert wire["inputs"][0]["data"] == arr.astype("<f4").tobytes()


# ---------------------------------------------------------------------------------------------
# Hostile bodies: only ProtocolError comes out, and messages stay short


DEEP = b"[" * 5000 + b"]" * 5000  # deeper than the decoder's recursion allows


def _json_tensor(name: str, datatype: str, shape: list[int], data: object) -> bytes:
    return json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}).encode()


@pytest.mark.parametrize(
    ("body", "content_type", "code"),
    [
        (_json_tensor("x", "FP32", [0, 4611686018427387904], []), CONTENT_TYPE_JSON, ErrorCode.INVALID_TENSOR),
        (_json_tensor("x", "FP32", [2**40, 2**40], [1.0]), CONTENT_TYPE_JSON, ErrorCode.INVALID_TENSOR),
        (_json_tensor("x", "FP32", [1] * 40, [1.0]), CONTENT_TYPE_JSON, ErrorCode.INVALID_TENSOR),
        (b'{"inputs": [' + DEEP + b"]}", CONTENT_TYPE_JSON, ErrorCode.BAD_ENCODING),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": '
            + b"[" * 5000
            + b"]" * 5000
            + b"}]}",
            CONTENT_TYPE_JSON,
            ErrorCode.BAD_ENCODING,
        ),
        (
            msgspec.msgpack.encode({"inputs": [], "id": "x"}).replace(b"\xa1x", b"\xa1\xff"),
            CONTENT_TYPE_MSGPACK,
            ErrorCode.BAD_ENCODING,
        ),
        (
            msgspec.msgpack.encode(
                {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": b"\0" * 4}]}
            ).replace(b"\xa1x", b"\xa1\xc3"),
            CONTENT_TYPE_MSGPACK,
            ErrorCode.BAD_ENCODING,
        ),
        (
            msgspec.msgpack.encode(
                {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [msgspec.msgpack.Ext(5, b"a")]}]}
            ),
            CONTENT_TYPE_MSGPACK,
            ErrorCode.BAD_ENCODING,
        ),
        (_json_tensor("x", "INT8", [1], [1.5]), CONTENT_TYPE_JSON, ErrorCode.INVALID_TENSOR),
        (_json_tensor("x", "INT8", [1], [300]), CONTENT_TYPE_JSON, ErrorCode.INVALID_TENSOR),
        (_json_tensor("x", "UINT64", [2], [2**64 - 1, -1]), CONTENT_TYPE_JSON, ErrorCode.INVALID_TENSOR),
        (_json_tensor("x", "FP32", [1], ["1.5"]), CONTENT_TYPE_JSON, ErrorCode.INVALID_TENSOR),
        (_json_tensor("x", "FP32", [1], ["inf"]), CONTENT_TYPE_JSON, ErrorCode.INVALID_TENSOR),
        (_json_tensor("x", "FP16", [1], [1e300]), CONTENT_TYPE_JSON, ErrorCode.INVALID_TENSOR),
        (_json_tensor("x", "BOOL", [2], [1, 0]), CONTENT_TYPE_JSON, ErrorCode.INVALID_TENSOR),
        (_json_tensor("x", "FP32", [2], [[1.0], [2.0, 3.0]]), CONTENT_TYPE_JSON, ErrorCode.INVALID_TENSOR),
        (_json_tensor("x", "FP32", [1], [None]), CONTENT_TYPE_JSON, ErrorCode.INVALID_TENSOR),
        (_json_tensor("x", "BYTES", [1], [{"a": 1}]), CONTENT_TYPE_JSON, ErrorCode.INVALID_TENSOR),
        (_json_tensor("x", "BYTES", [1], [[[[["a"]]]]]), CONTENT_TYPE_JSON, None),
        (_json_tensor("x", "BYTES", [1], "a"), CONTENT_TYPE_JSON, ErrorCode.INVALID_TENSOR),
    ],
)
def test_hostile_bodies_raise_only_protocol_errors(body: bytes, content_type: str, code: ErrorCode | None) -> None:
    if code is None:  # accepted: nested BYTES lists are flattened
        assert decode_request(body, content_type).inputs["x"].tolist() == ["a"]
        return
    with pytest.raises(ProtocolError) as caught:
        decode_request(body, content_type)
    assert caught.value.code == code
    assert len(caught.value.message) < 500


def test_a_huge_input_name_is_echoed_clipped() -> None:
    name = "\0" * 2_000_000
    with pytest.raises(ProtocolError) as caught:
        decode_request(_json_tensor(name, "FP99", [1], [1]), CONTENT_TYPE_JSON)
    assert len(caught.value.message) < 600
    assert "2000000 characters" in caught.value.message


def test_clip_bounds_every_kind_of_value() -> None:
    assert clip("name") == "'name'"
    assert clip([1, 2]) == "[1, 2]"
    for value in ("x" * 10**6, b"x" * 10**6, list(range(10**5)), [["y" * 10**5] * 100] * 100, {"k" * 10**5: 1}):
        assert len(clip(value)) <= CLIP_CHARS + 30


def test_zero_size_tensors_keep_their_shape() -> None:
    request = decode_request(_json_tensor("x", "FP32", [0, 3], []), CONTENT_TYPE_JSON)
    assert request.inputs["x"].shape == (0, 3)
    assert request.rows == 0


# ---------------------------------------------------------------------------------------------
# Non-finite floats in JSON

NON_FINITE_VALUES = np.array([[np.nan, np.inf], [-np.inf, -0.5]])


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
@pytest.mark.parametrize("content_type", ENCODINGS)
def test_non_finite_floats_round_trip_in_replies(datatype: str, content_type: str) -> None:
    values = NON_FINITE_VALUES.astype(DATATYPES[datatype])
    reply = decode_reply(encode_reply("r", {"y": values}, content_type, model_name="m"), content_type)
    assert isinstance(reply, InferReply)
    assert reply.outputs["y"].dtype == values.dtype
    np.testing.assert_array_equal(reply.outputs["y"], values)


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_non_finite_floats_round_trip_in_json_requests(datatype: str) -> None:
    values = NON_FINITE_VALUES.astype(DATATYPES[datatype])
    request = decode_request(encode_request({"x": values}, CONTENT_TYPE_JSON), CONTENT_TYPE_JSON)
    np.testing.assert_array_equal(request.inputs["x"], values)


def test_json_writes_non_finite_floats_as_protobuf_json_strings() -> None:
    body = encode_reply("1", {"y": np.array([np.nan, np.inf, -np.inf, 2.0])}, CONTENT_TYPE_JSON, model_name="m")
    assert json.loads(body)["outputs"][0]["data"] == ["NaN", "Infinity", "-Infinity", 2.0]


def test_json_requests_may_mix_numbers_and_non_finite_strings() -> None:
    request = decode_request(_json_tensor("x", "FP32", [2, 2], [[1, "NaN"], ["-Infinity", 2.5]]), CONTENT_TYPE_JSON)
    np.testing.assert_array_equal(request.inputs["x"], np.array([[1, np.nan], [-np.inf, 2.5]], dtype=np.float32))
