"""The worker's answer to a metadata request: the served model's OIP metadata, built once from the pipeline.

Costs no model run: names, datatypes and shapes come from the pipeline's tensor specs, the limits
from the settings. The bodies (JSON and msgpack) are encoded once per worker; a request's reply is
one of them. See :mod:`producer.wire.metadata` for the wire contract.

Called by ``worker.intake`` (for each metadata request).
"""

from __future__ import annotations

from typing import Any

from producer.wire.metadata import PLATFORM, ModelMetadata, TensorMetadata, encode_metadata
from producer.wire.names import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK
from producer.wire.protocol import reply_content_type
from worker.pipelines.session import Pipeline, TensorSpec
from worker.settings import Settings

__all__ = ["MAX_LISTED_TENSORS", "MetadataReplies", "model_metadata"]

MAX_LISTED_TENSORS = 256
"""Most inputs (and outputs) listed; a model with more is listed up to this many and says so (bounded replies)."""


def _tensors(specs: dict[str, TensorSpec]) -> list[TensorMetadata]:
    return [
        TensorMetadata(name=s.name, datatype=s.datatype, shape=[-1 if d is None else d for d in s.shape])
        for s in list(specs.values())[:MAX_LISTED_TENSORS]
    ]


def model_metadata(pipeline: Pipeline, settings: Settings) -> ModelMetadata:
    """The OIP model metadata of what this worker serves, with its limits as ``parameters``.

    ``parameters``: ``max_batch_rows`` (rows per request and per run), ``max_message_bytes``,
    ``providers`` (ONNX Runtime's, in order of preference), and for a text model ``max_text_bytes`` and
    ``max_text_tokens`` (longer texts are truncated at that many tokens).
    """
    parameters: dict[str, Any] = {
        "max_batch_rows": settings.max_batch,
        "max_message_bytes": settings.max_message_bytes,
        "providers": list(pipeline.providers),
    }
    # Text pipelines (worker.pipelines.text) bound texts in bytes and tokens; tensor pipelines have neither.
    max_text_bytes = getattr(pipeline, "max_text_bytes", None)
    max_tokens = getattr(getattr(pipeline, "text", None), "max_length", None)
    if isinstance(max_text_bytes, int):
        parameters["max_text_bytes"] = max_text_bytes
    if isinstance(max_tokens, int):
        parameters["max_text_tokens"] = max_tokens
    listed = max(len(pipeline.inputs), len(pipeline.outputs))
    if listed > MAX_LISTED_TENSORS:
        parameters["tensors_listed"] = MAX_LISTED_TENSORS
    return ModelMetadata(
        name=pipeline.name,
        versions=[pipeline.version],
        platform=PLATFORM,
        inputs=_tensors(pipeline.inputs),
        outputs=_tensors(pipeline.outputs),
        parameters=parameters,
    )


class MetadataReplies:
    """The encoded metadata reply bodies of one worker, by reply content type."""

    def __init__(self, pipeline: Pipeline, settings: Settings) -> None:
        self.metadata = model_metadata(pipeline, settings)
        self._bodies = {ct: encode_metadata(self.metadata, ct) for ct in (CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK)}

    def body(self, request_content_type: str | None) -> tuple[bytes, str]:
        """The reply body and its content type for a metadata request of ``request_content_type``."""
        content_type = reply_content_type(request_content_type)
        return self._bodies[content_type], content_type
