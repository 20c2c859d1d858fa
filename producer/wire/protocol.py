"""The wire contract: Open Inference Protocol (KServe V2 / Triton) messages over AMQP.

Pure functions over bytes and numpy arrays; nothing here touches the broker.

Two encodings, chosen by the AMQP ``content_type``:

* ``application/json``: OIP JSON exactly as a KServe or Triton client sends it; tensor
  ``data`` is a flat (or nested) list in row-major order, BYTES elements are strings. JSON has no
  literal for non-finite floats: they travel as the strings ``"NaN"``, ``"Infinity"`` and
  ``"-Infinity"`` (as in protobuf's JSON mapping), both ways.
* ``application/msgpack``: the same fields, but numeric tensor ``data`` is the raw
  little-endian buffer (msgpack bin); BYTES data is a list of str/bin elements.

Decoding never trusts the body: any malformed, mistyped, oversized (declared shape) or too deeply
nested body raises :class:`ProtocolError`, and error messages echo input values cut to a bounded
length (:func:`producer.wire.errors.clip`).

A reply uses the request's encoding. Errors travel as ``{"id", "error": {"code", "message"}}``
with a code from :class:`ErrorCode`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

from producer.wire.errors import CLIP_CHARS, ProtocolError, clip
from producer.wire.names import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK

__all__ = [
    "DATATYPES",
    "ErrorCode",
    "ErrorDetail",
    "ErrorReply",
    "InferReply",
    "InferRequest",
    "as_tensor",
    "decode_reply",
    "decode_request",
    "decode_struct",
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
    """An input's rank or non-batch dimensions differ from the model's, inputs disagree on rows, or the request
    has 0 rows."""
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
_T = TypeVar("_T")
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


def _reject_ext(code: int, data: memoryview) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of the inference protocol")


_json_request = msgspec.json.Decoder(RequestMsg)
_msgpack_request = msgspec.msgpack.Decoder(RequestMsg, ext_hook=_reject_ext)
_json_reply = msgspec.json.Decoder(_AnyReply)
_msgpack_reply = msgspec.msgpack.Decoder(_AnyReply, ext_hook=_reject_ext)
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


MAX_RANK = 32
"""Most dimensions a tensor may declare."""

MAX_ELEMENTS = 2**31
"""Most elements a tensor may declare: more than any accepted message body can carry. For a tensor
with a 0 dimension, the product of its other dimensions is bounded too, so no declared shape can
make numpy allocate or overflow."""

NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
"""How JSON carries non-finite floats (as protobuf's JSON mapping does): JSON has no literal for them."""

# Errors decoding or converting hostile data may raise; each becomes a ProtocolError.
_DATA_ERRORS = (TypeError, ValueError, OverflowError, ArithmeticError, RecursionError, MemoryError)


def _check_shape(name: str, datatype: str, shape: list[int]) -> int:
    """The element count of ``shape``, checked before anything is allocated for it."""
    if len(shape) > MAX_RANK:
        raise ProtocolError(
            ErrorCode.INVALID_TENSOR,
            f"input {clip(name)}: shape has {len(shape)} dimensions; at most {MAX_RANK} are supported",
        )
    if any(d < 0 for d in shape):
        raise ProtocolError(ErrorCode.INVALID_TENSOR, f"input {clip(name)}: negative dimension in shape {clip(shape)}")
    nonzero = 1
    for d in shape:
        nonzero *= d or 1
        if nonzero > MAX_ELEMENTS:
            raise ProtocolError(
                ErrorCode.INVALID_TENSOR,
                f"input {clip(name)}: shape {clip(shape)} is too large: its non-zero dimensions multiply to more "
                f"than {MAX_ELEMENTS} elements",
            )
    return 0 if 0 in shape else nonzero


def _tensor_from_wire(t: TensorMsg, *, binary: bool) -> npt.NDArray[Any]:
    dtype = DATATYPES.get(t.datatype)
    if dtype is None:
        raise ProtocolError(
            ErrorCode.INVALID_TENSOR,
            f"input {clip(t.name)}: unknown datatype {clip(t.datatype)}; use one of {', '.join(DATATYPES)}",
        )
    count = _check_shape(t.name, t.datatype, t.shape)
    data = t.data
    try:
        if t.datatype == "BYTES":
            if not isinstance(data, list):
                raise TypeError("BYTES data must be a list of strings")
            items = _flatten_bytes(data)
            arr = np.empty(len(items), dtype=object)
            arr[:] = items
        elif binary and isinstance(data, bytes | bytearray | memoryview):
            if len(data) != count * dtype.itemsize:
                raise ProtocolError(
                    ErrorCode.INVALID_TENSOR,
                    f"input {clip(t.name)}: {len(data)} bytes of data, but shape {clip(t.shape)} of {t.datatype} "
                    f"needs {count * dtype.itemsize}",
                )
            arr = np.frombuffer(data, dtype=dtype)
        elif isinstance(data, list):
            arr = _numbers_from_list(data, t.datatype, dtype)
        else:
            raise TypeError(f"data must be a list{' or raw bytes' if binary else ''}, not {type(data).__name__}")
        if arr.size != count:
            raise ProtocolError(
                ErrorCode.INVALID_TENSOR,
                f"input {clip(t.name)}: {arr.size} elements of data, but shape {clip(t.shape)} needs {count}",
            )
        return arr.reshape(t.shape)
    except ProtocolError:
        raise
    except _DATA_ERRORS as e:
        raise ProtocolError(ErrorCode.INVALID_TENSOR, f"input {clip(t.name)}: {_shorten(str(e))}") from e


def _shorten(text: str) -> str:
    """An error text from a library, which may quote the input, cut to :data:`CLIP_CHARS`."""
    return text if len(text) <= CLIP_CHARS else text[: CLIP_CHARS - 3] + "..."


def _flatten_bytes(data: list[Any]) -> list[Any]:
    """The elements of a (possibly nested) BYTES data list, in row-major order; each a str or bytes."""
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) >= MAX_RANK:
                    raise ValueError(f"BYTES data is nested more than {MAX_RANK} lists deep")
                stack.append(iter(item))
                break
            if not isinstance(item, str | bytes):
                raise TypeError(f"BYTES elements must be strings, got {type(item).__name__}")
            out.append(item)
        else:
            stack.pop()
    return out


def _numbers_from_list(data: list[Any], datatype: str, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """A flat array of ``dtype`` from a (possibly nested) list of JSON numbers.

    Booleans for BOOL, integers for integer types (in range), numbers or the strings of
    :data:`NON_FINITE` for float types; anything else is refused rather than converted.
    """
    raw = np.asarray(data)  # ValueError for ragged lists
    if raw.size == 0:
        return np.empty(0, dtype=dtype)
    kind = raw.dtype.kind
    if dtype.kind == "b" and kind == "b":
        return raw.reshape(-1)
    if dtype.kind in "iu" and kind in "iu":
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise OverflowError(f"{datatype} values must be within [{info.min}, {info.max}]")
        return raw.astype(dtype).reshape(-1)
    if dtype.kind == "f" and kind in "iuf":
        return _to_float(raw, datatype, dtype).reshape(-1)
    # Mixed, out-of-range or non-numeric elements: check each one.
    items = np.asarray(data, dtype=object).reshape(-1).tolist()
    for index, item in enumerate(items):
        if dtype.kind == "f" and isinstance(item, str) and item in NON_FINITE:
            items[index] = NON_FINITE[item]
        elif not _fits(item, dtype.kind):
            want = {"b": "true or false", "f": 'numbers, "NaN", "Infinity" or "-Infinity"'}.get(dtype.kind, "integers")
            raise TypeError(f"element {index} is {clip(item)}; {datatype} data must be {want}")
    if dtype.kind == "f":
        return _to_float(np.array(items, dtype=np.float64), datatype, dtype)
    return np.array(items, dtype=dtype)


def _to_float(values: npt.NDArray[Any], datatype: str, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """``values`` as ``dtype``; a finite value too large for it is refused rather than made infinite."""
    try:
        with np.errstate(over="raise"):
            return values.astype(dtype)
    except FloatingPointError:
        raise OverflowError(
            f"a value is too large for {datatype} (largest {float(np.finfo(dtype).max):g}); "
            'send "Infinity" or "-Infinity" for infinite values'
        ) from None


def _fits(item: Any, kind: str) -> bool:
    if kind == "b":
        return isinstance(item, bool)
    if isinstance(item, bool):
        return False
    return isinstance(item, int) or (kind == "f" and isinstance(item, float))


def _json_floats(flat: npt.NDArray[np.floating[Any]]) -> list[Any]:
    """Floats for JSON: non-finite values as the strings of :data:`NON_FINITE`, which JSON numbers cannot hold."""
    items: npt.NDArray[Any] = flat.astype(object)
    items[np.isnan(flat)] = "NaN"
    items[np.isposinf(flat)] = "Infinity"
    items[np.isneginf(flat)] = "-Infinity"
    return items.tolist()  # type: ignore[no-any-return]


def _tensor_to_wire(name: str, arr: npt.NDArray[Any], *, binary: bool) -> TensorMsg:
    datatype = numpy_to_datatype(arr.dtype)
    shape = list(arr.shape)
    data: Any
    if datatype == "BYTES":
        data = [x.decode() if isinstance(x, bytes) and not binary else x for x in arr.reshape(-1).tolist()]
    elif binary:
        data = np.ascontiguousarray(arr, dtype=DATATYPES[datatype]).tobytes()
    elif arr.dtype.kind == "f" and not np.isfinite(arr).all():
        data = _json_floats(arr.reshape(-1))
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
        f"content type {clip(content_type)} is not supported; send {CONTENT_TYPE_MSGPACK} or {CONTENT_TYPE_JSON}",
    )


def decode_struct(decoder: msgspec.json.Decoder[_T] | msgspec.msgpack.Decoder[_T], body: bytes, what: str) -> _T:
    """Decode ``body`` into a wire struct; every way a hostile body can fail becomes a ProtocolError."""
    kind = "msgpack" if isinstance(decoder, msgspec.msgpack.Decoder) else "JSON"
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as e:  # includes ValidationError: a wrong type or a missing field
        raise ProtocolError(ErrorCode.BAD_ENCODING, f"body is not a valid {kind} {what}: {_shorten(str(e))}") from e
    except RecursionError as e:
        raise ProtocolError(ErrorCode.BAD_ENCODING, f"body is not a valid {kind} {what}: nested too deeply") from e
    except UnicodeDecodeError as e:
        raise ProtocolError(
            ErrorCode.BAD_ENCODING, f"body is not a valid {kind} {what}: a string is not valid UTF-8 ({e.reason})"
        ) from e
    except MemoryError as e:
        raise ProtocolError(
            ErrorCode.BAD_ENCODING, f"body is not a valid {kind} {what}: it expands beyond the memory available"
        ) from e
    except (ValueError, TypeError, OverflowError) as e:  # raised by hooks, e.g. a msgpack extension type
        raise ProtocolError(ErrorCode.BAD_ENCODING, f"body is not a valid {kind} {what}: {_shorten(str(e))}") from e


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
    msg = decode_struct(_msgpack_request if binary else _json_request, body, "inference request")
    if not msg.inputs:
        raise ProtocolError(ErrorCode.BAD_ENCODING, "request has no inputs; send at least one tensor in 'inputs'")
    inputs: dict[str, npt.NDArray[Any]] = {}
    for t in msg.inputs:
        if t.name in inputs:
            raise ProtocolError(ErrorCode.INVALID_TENSOR, f"input {clip(t.name)} appears twice")
        inputs[t.name] = _tensor_from_wire(t, binary=binary)
    rows = {name: (a.shape[0] if a.ndim else None) for name, a in inputs.items()}
    if len(set(rows.values())) > 1:
        raise ProtocolError(
            ErrorCode.WRONG_SHAPE, f"inputs disagree on the number of rows (first dimension): {clip(rows)}"
        )
    return InferRequest(
        id=msg.id or default_id,
        inputs=inputs,
        outputs=[o.name for o in msg.outputs] if msg.outputs else None,
        parameters=msg.parameters or {},
    )


def as_tensor(value: npt.ArrayLike | Sequence[str]) -> npt.NDArray[Any]:
    """The array a request carries for ``value`` (a list of strings becomes an object array: BYTES)."""
    arr = np.asarray(value)
    return arr.astype(object) if arr.dtype.kind == "U" else arr


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
    tensors = [_tensor_to_wire(name, as_tensor(value), binary=binary) for name, value in inputs.items()]
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
    msg = decode_struct(_msgpack_reply if binary else _json_reply, body, "inference reply")
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
