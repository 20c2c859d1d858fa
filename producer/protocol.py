"""The wire contract: Open Inference Protocol (KServe V2 / Triton) messages over AMQP.

Pure functions over bytes and numpy arrays; nothing here touches the broker.

Two encodings, chosen by the AMQP ``content_type``:

* ``application/json``: OIP JSON exactly as a KServe or Triton client sends it; tensor
  ``data`` is a flat (or nested) list in row-major order, BYTES elements are strings.
* ``application/msgpack``: the same fields, but numeric tensor ``data`` is the raw
  little-endian buffer (msgpack bin); BYTES data is a list of str/bin elements.

A reply uses the request's encoding. Errors travel as ``{"id", "error": {"code", "message"}}``
with a code from :class:`ErrorCode`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from producer.errors import ProtocolError
from producer.names import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK

__all__ = [
    "DATATYPES",
    "ErrorCode",
    "ErrorDetail",
    "ErrorReply",
    "InferReply",
    "InferRequest",
    "decode_reply",
    "decode_request",
    "encode_error",
    "encode_reply",
    "encode_request",
    "numpy_to_datatype",
]


class ErrorCode(enum.StrEnum):
    """Stable error codes carried by error replies. Clients may switch on them."""

    BAD_ENCODING = "bad_encoding"
    """The body could not be decoded with its content type, or misses required fields."""
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    """The content type is neither application/json nor application/msgpack."""
    MESSAGE_TOO_LARGE = "message_too_large"
    """The body is larger than the worker's WORKER_MAX_MESSAGE_BYTES; it was not decoded."""
    INVALID_TENSOR = "invalid_tensor"
    """A tensor's datatype is unknown or its data does not match its shape."""
    UNKNOWN_INPUT = "unknown_input"
    """An input name the model does not have."""
    MISSING_INPUT = "missing_input"
    """An input the model needs is absent."""
    WRONG_DATATYPE = "wrong_datatype"
    """An input's datatype differs from the model's."""
    WRONG_SHAPE = "wrong_shape"
    """An input's rank or non-batch dimensions differ from the model's, or inputs disagree on rows."""
    TOO_MANY_ROWS = "too_many_rows"
    """A request carries more rows than the worker's maximum batch."""
    TEXT_TOO_LONG = "text_too_long"
    """A text is longer (UTF-8 bytes) than the worker's WORKER_MAX_TEXT_BYTES; it was not tokenized."""
    UNKNOWN_OUTPUT = "unknown_output"
    """A requested output name the model does not have."""
    DEADLINE_EXCEEDED = "deadline_exceeded"
    """The request's deadline passed before it was computed; it was not computed."""
    INFERENCE_FAILED = "inference_failed"
    """The model failed on this request (other requests in its batch were answered)."""
    INTERNAL = "internal"
    """An unexpected worker error; the message says what happened."""


# OIP datatype name -> numpy dtype (little-endian on the wire).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}
_KIND_TO_DATATYPE = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items() if name != "BYTES"}


def numpy_to_datatype(dtype: np.dtype[Any]) -> str:
    """The OIP datatype name of a numpy dtype (``object``/``str``/``bytes`` map to BYTES).

    Raises:
        ProtocolError: when the dtype has no OIP equivalent.
    """
    if dtype.kind in ("O", "U", "S"):
        return "BYTES"
    try:
        return _KIND_TO_DATATYPE[(dtype.kind, dtype.itemsize)]
    except KeyError:
        raise ProtocolError(ErrorCode.INVALID_TENSOR, f"numpy dtype {dtype} has no OIP datatype") from None


# ---------------------------------------------------------------------------------------------
# Wire structs. ``data`` is Any because its form depends on the encoding; it is checked below.


class TensorMsg(msgspec.Struct, omit_defaults=True):
    name: str
    datatype: str
    shape: list[int]
    data: Any
    parameters: dict[str, Any] | None = None


class RequestedOutput(msgspec.Struct, omit_defaults=True):
    name: str
    parameters: dict[str, Any] | None = None


class RequestMsg(msgspec.Struct, omit_defaults=True):
    inputs: list[TensorMsg]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


class ReplyMsg(msgspec.Struct, omit_defaults=True):
    id: str
    model_name: str
    outputs: list[TensorMsg]
    model_version: str | None = None
    parameters: dict[str, Any] | None = None


class ErrorDetail(msgspec.Struct):
    code: str
    message: str


class ErrorMsg(msgspec.Struct):
    id: str
    error: ErrorDetail


class _AnyReply(msgspec.Struct, omit_defaults=True):
    """Either reply form; decoded once, then told apart by which fields are present."""

    id: str = ""
    model_name: str = ""
    outputs: list[TensorMsg] | None = None
    model_version: str | None = None
    parameters: dict[str, Any] | None = None
    error: ErrorDetail | None = None


_json_request = msgspec.json.Decoder(RequestMsg)
_msgpack_request = msgspec.msgpack.Decoder(RequestMsg)
_json_reply = msgspec.json.Decoder(_AnyReply)
_msgpack_reply = msgspec.msgpack.Decoder(_AnyReply)
_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


# ---------------------------------------------------------------------------------------------
# Domain objects (what the rest of the code works with).


class InferRequest(msgspec.Struct, kw_only=True):
    """A decoded request: named numpy inputs, all sharing the first (row) dimension."""

    id: str
    inputs: dict[str, npt.NDArray[Any]]
    outputs: list[str] | None = None
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows in this request (first dimension of its inputs; 1 for scalars)."""
        first = next(iter(self.inputs.values()))
        return int(first.shape[0]) if first.ndim else 1


class InferReply(msgspec.Struct, kw_only=True):
    """A decoded successful reply."""

    id: str
    model_name: str
    model_version: str | None
    outputs: dict[str, npt.NDArray[Any]]
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class ErrorReply(msgspec.Struct, kw_only=True):
    """A decoded error reply."""

    id: str
    code: str
    message: str


# ---------------------------------------------------------------------------------------------
# Tensors


def _tensor_from_wire(t: TensorMsg, *, binary: bool) -> npt.NDArray[Any]:
    dtype = DATATYPES.get(t.datatype)
    if dtype is None:
        raise ProtocolError(
            ErrorCode.INVALID_TENSOR,
            f"input {t.name!r}: unknown datatype {t.datatype!r}; use one of {', '.join(DATATYPES)}",
        )
    if any(d < 0 for d in t.shape):
        raise ProtocolError(ErrorCode.INVALID_TENSOR, f"input {t.name!r}: negative dimension in shape {t.shape}")
    count = math.prod(t.shape)
    data = t.data
    try:
        if t.datatype == "BYTES":
            if not isinstance(data, list):
                raise TypeError("BYTES data must be a list of strings")
            flat = np.empty(len(data), dtype=object)
            flat[:] = _flatten(data)
            arr = flat
        elif binary and isinstance(data, bytes | bytearray | memoryview):
            if len(data) != count * dtype.itemsize:
                raise ProtocolError(
                    ErrorCode.INVALID_TENSOR,
                    f"input {t.name!r}: {len(data)} bytes of data, but shape {t.shape} of {t.datatype} "
                    f"needs {count * dtype.itemsize}",
                )
            arr = np.frombuffer(data, dtype=dtype)
        elif isinstance(data, list):
            arr = np.asarray(data, dtype=dtype).reshape(-1)
        else:
            raise TypeError(f"data must be a list{' or raw bytes' if binary else ''}, not {type(data).__name__}")
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(ErrorCode.INVALID_TENSOR, f"input {t.name!r}: {e}") from e
    if arr.size != count:
        raise ProtocolError(
            ErrorCode.INVALID_TENSOR,
            f"input {t.name!r}: {arr.size} elements of data, but shape {t.shape} needs {count}",
        )
    return arr.reshape(t.shape)


def _flatten(data: list[Any]) -> list[Any]:
    if data and isinstance(data[0], list):
        out: list[Any] = []
        for item in data:
            out.extend(_flatten(item) if isinstance(item, list) else [item])
        data = out
    for item in data:
        if not isinstance(item, str | bytes):
            raise TypeError(f"BYTES elements must be strings, got {type(item).__name__}")
    return data


def _tensor_to_wire(name: str, arr: npt.NDArray[Any], *, binary: bool) -> TensorMsg:
    datatype = numpy_to_datatype(arr.dtype)
    shape = list(arr.shape)
    data: Any
    if datatype == "BYTES":
        data = [x.decode() if isinstance(x, bytes) and not binary else x for x in arr.reshape(-1).tolist()]
    elif binary:
        data = np.ascontiguousarray(arr, dtype=DATATYPES[datatype]).tobytes()
    else:
        data = arr.reshape(-1).tolist()
    return TensorMsg(name=name, datatype=datatype, shape=shape, data=data)


# ---------------------------------------------------------------------------------------------
# Requests


def _is_binary(content_type: str | None) -> bool:
    if content_type == CONTENT_TYPE_MSGPACK:
        return True
    if content_type == CONTENT_TYPE_JSON:
        return False
    raise ProtocolError(
        ErrorCode.UNSUPPORTED_CONTENT_TYPE,
        f"content type {content_type!r} is not supported; send {CONTENT_TYPE_MSGPACK} or {CONTENT_TYPE_JSON}",
    )


def decode_request(body: bytes, content_type: str | None, *, default_id: str = "") -> InferRequest:
    """Decode and structurally check one request body.

    Args:
        body: the AMQP message body.
        content_type: the AMQP ``content_type`` property.
        default_id: used when the body carries no ``id`` (normally the correlation id).

    Raises:
        ProtocolError: with a code from :class:`ErrorCode` and a message a person can act on.
    """
    binary = _is_binary(content_type)
    try:
        msg = (_msgpack_request if binary else _json_request).decode(body)
    except msgspec.DecodeError as e:
        kind = "msgpack" if binary else "JSON"
        raise ProtocolError(ErrorCode.BAD_ENCODING, f"body is not a valid {kind} inference request: {e}") from e
    if not msg.inputs:
        raise ProtocolError(ErrorCode.BAD_ENCODING, "request has no inputs; send at least one tensor in 'inputs'")
    inputs: dict[str, npt.NDArray[Any]] = {}
    for t in msg.inputs:
        if t.name in inputs:
            raise ProtocolError(ErrorCode.INVALID_TENSOR, f"input {t.name!r} appears twice")
        inputs[t.name] = _tensor_from_wire(t, binary=binary)
    rows = {name: (a.shape[0] if a.ndim else None) for name, a in inputs.items()}
    if len(set(rows.values())) > 1:
        raise ProtocolError(ErrorCode.WRONG_SHAPE, f"inputs disagree on the number of rows (first dimension): {rows}")
    return InferRequest(
        id=msg.id or default_id,
        inputs=inputs,
        outputs=[o.name for o in msg.outputs] if msg.outputs else None,
        parameters=msg.parameters or {},
    )


def encode_request(
    inputs: Mapping[str, npt.ArrayLike | Sequence[str]],
    content_type: str = CONTENT_TYPE_MSGPACK,
    *,
    request_id: str | None = None,
    outputs: Sequence[str] | None = None,
    parameters: dict[str, Any] | None = None,
) -> bytes:
    """Encode a request body from named arrays (lists of strings become BYTES tensors)."""
    binary = _is_binary(content_type)
    tensors = []
    for name, value in inputs.items():
        arr = np.asarray(value)
        if arr.dtype.kind == "U":
            arr = arr.astype(object)
        tensors.append(_tensor_to_wire(name, arr, binary=binary))
    msg = RequestMsg(
        id=request_id,
        inputs=tensors,
        outputs=[RequestedOutput(name=n) for n in outputs] if outputs else None,
        parameters=parameters,
    )
    return (_msgpack_encoder if binary else _json_encoder).encode(msg)


# ---------------------------------------------------------------------------------------------
# Replies


def encode_reply(
    request_id: str,
    outputs: Mapping[str, npt.NDArray[Any]],
    content_type: str,
    *,
    model_name: str,
    model_version: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> bytes:
    """Encode a successful reply in the request's encoding."""
    binary = content_type == CONTENT_TYPE_MSGPACK
    msg = ReplyMsg(
        id=request_id,
        model_name=model_name,
        model_version=model_version,
        outputs=[_tensor_to_wire(n, a, binary=binary) for n, a in outputs.items()],
        parameters=parameters,
    )
    return (_msgpack_encoder if binary else _json_encoder).encode(msg)


def encode_error(request_id: str, code: ErrorCode | str, message: str, content_type: str | None) -> bytes:
    """Encode an error reply; unknown content types get JSON, the form anyone can read."""
    msg = ErrorMsg(id=request_id, error=ErrorDetail(code=str(code), message=message))
    if content_type == CONTENT_TYPE_MSGPACK:
        return _msgpack_encoder.encode(msg)
    return _json_encoder.encode(msg)


def reply_content_type(request_content_type: str | None) -> str:
    """The content type of the reply to a request of this content type."""
    return CONTENT_TYPE_MSGPACK if request_content_type == CONTENT_TYPE_MSGPACK else CONTENT_TYPE_JSON


def decode_reply(body: bytes, content_type: str | None) -> InferReply | ErrorReply:
    """Decode a reply body into :class:`InferReply` or :class:`ErrorReply`.

    Raises:
        ProtocolError: when the body is neither form.
    """
    binary = _is_binary(content_type)
    try:
        msg = (_msgpack_reply if binary else _json_reply).decode(body)
    except msgspec.DecodeError as e:
        raise ProtocolError(ErrorCode.BAD_ENCODING, f"reply is not a valid inference reply: {e}") from e
    if msg.error is not None:
        return ErrorReply(id=msg.id, code=msg.error.code, message=msg.error.message)
    if msg.outputs is None:
        raise ProtocolError(ErrorCode.BAD_ENCODING, "reply has neither 'outputs' nor 'error'")
    return InferReply(
        id=msg.id,
        model_name=msg.model_name,
        model_version=msg.model_version,
        outputs={t.name: _tensor_from_wire(t, binary=binary) for t in msg.outputs},
        parameters=msg.parameters or {},
    )
