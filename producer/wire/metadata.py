"""Model metadata over the queue: how a metadata request is marked, the reply's shape, and its codec.

A metadata request is an ordinary request message (``reply_to``, ``correlation_id``, deadline
headers) to a worker's request queue, a model's route or a version's queue, marked with the header
``x-qinfer-kind: metadata`` (:data:`producer.wire.names.HEADER_KIND`) and with an empty body (at most
:data:`MAX_METADATA_REQUEST_BYTES`). The worker answers it without running the model, with the Open
Inference Protocol's model metadata (KServe V2 ``GET v2/models/{name}``)::

    {"name": "mlp", "versions": ["1"], "platform": "onnxruntime_onnx",
     "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
     "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 8]}],
     "parameters": {"max_batch_rows": 32, "max_message_bytes": 16777216, ...}}

(``-1``: a free dimension; ``parameters`` holds the worker's limits), or with an error reply of the
usual form. Encoded like any reply: msgpack for a msgpack request, else JSON.

Pure (no I/O). Called by :class:`producer.Client` (decode), ``producer.amqp.messages`` (the request message)
and ``worker.metadata`` / ``worker.intake`` (encode, recognise).
"""

from __future__ import annotations

from typing import Any

import msgspec

from producer.wire.errors import ProtocolError
from producer.wire.names import CONTENT_TYPE_MSGPACK, HEADER_KIND, KIND_METADATA
from producer.wire.protocol import ErrorCode, ErrorDetail, ErrorReply, decode_struct

__all__ = [
    "MAX_METADATA_REQUEST_BYTES",
    "PLATFORM",
    "ModelMetadata",
    "TensorMetadata",
    "decode_metadata",
    "encode_metadata",
    "is_metadata_request",
]

PLATFORM = "onnxruntime_onnx"
"""The OIP platform name of every qinfer model (Triton's name for ONNX Runtime)."""

MAX_METADATA_REQUEST_BYTES = 1024
"""Largest body a metadata request may carry (it needs none); a larger one gets ``message_too_large``."""


class TensorMetadata(msgspec.Struct, frozen=True):
    """One input or output: name, OIP datatype, shape with ``-1`` for a free dimension."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(msgspec.Struct, frozen=True, kw_only=True):
    """OIP model metadata plus the worker's limits in ``parameters``."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class _AnyMetadataReply(msgspec.Struct, omit_defaults=True):
    """Either a metadata reply or an error reply; told apart by which fields are present."""

    id: str = ""
    name: str | None = None
    versions: list[str] = msgspec.field(default_factory=list)
    platform: str = ""
    inputs: list[TensorMetadata] = msgspec.field(default_factory=list)
    outputs: list[TensorMetadata] = msgspec.field(default_factory=list)
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    error: ErrorDetail | None = None


_json_decoder = msgspec.json.Decoder(_AnyMetadataReply)
_msgpack_decoder = msgspec.msgpack.Decoder(_AnyMetadataReply)


def is_metadata_request(headers: dict[str, Any] | None) -> bool:
    """True when a request's headers mark it as a metadata request."""
    if not headers:
        return False
    kind = headers.get(HEADER_KIND)
    if isinstance(kind, bytes):  # AMQP long strings may arrive as bytes
        kind = kind.decode(errors="replace")
    return kind == KIND_METADATA


def encode_metadata(metadata: ModelMetadata, content_type: str | None) -> bytes:
    """``metadata`` as a reply body: msgpack for a msgpack request, else JSON."""
    if content_type == CONTENT_TYPE_MSGPACK:
        return msgspec.msgpack.encode(metadata)
    return msgspec.json.encode(metadata)


def decode_metadata(body: bytes, content_type: str | None) -> ModelMetadata | ErrorReply:
    """Decode a metadata reply (or the error reply a worker sent instead).

    Raises:
        ProtocolError: ``bad_encoding`` when the body is neither form.
    """
    decoder = _msgpack_decoder if content_type == CONTENT_TYPE_MSGPACK else _json_decoder
    msg = decode_struct(decoder, body, "model metadata reply")
    if msg.error is not None:
        return ErrorReply(id=msg.id, code=msg.error.code, message=msg.error.message)
    if msg.name is None:
        raise ProtocolError(ErrorCode.BAD_ENCODING, "reply has neither 'name' (model metadata) nor 'error'")
    return ModelMetadata(
        name=msg.name,
        versions=msg.versions,
        platform=msg.platform,
        inputs=msg.inputs,
        outputs=msg.outputs,
        parameters=msg.parameters,
    )
