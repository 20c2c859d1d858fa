"""Model metadata: the wire codec (both encodings, the error form, hostile bodies) and what a worker builds."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.wire.errors import ProtocolError
from producer.wire.metadata import (
    PLATFORM,
    ModelMetadata,
    TensorMetadata,
    decode_metadata,
    encode_metadata,
    is_metadata_request,
)
from producer.wire.names import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, HEADER_KIND, KIND_METADATA
from producer.wire.protocol import ErrorReply, encode_error
from tests.support.models import mlp_model, text_model_folder
from worker.metadata import MetadataReplies, model_metadata
from worker.pipelines.tensor import load_pipeline
from worker.settings import Settings

META = ModelMetadata(
    name="mlp",
    versions=["1"],
    platform=PLATFORM,
    inputs=[TensorMetadata(name="x", datatype="FP32", shape=[-1, 16])],
    outputs=[TensorMetadata(name="y", datatype="FP32", shape=[-1, 8])],
    parameters={"max_batch_rows": 32},
)


@pytest.mark.parametrize("content_type", [CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK])
def test_metadata_round_trips_in_both_encodings(content_type: str) -> None:
    assert decode_metadata(encode_metadata(META, content_type), content_type) == META


def test_the_json_form_is_the_oip_model_metadata_shape() -> None:
    assert encode_metadata(META, CONTENT_TYPE_JSON) == (
        b'{"name":"mlp","versions":["1"],"platform":"onnxruntime_onnx",'
        b'"inputs":[{"name":"x","datatype":"FP32","shape":[-1,16]}],'
        b'"outputs":[{"name":"y","datatype":"FP32","shape":[-1,8]}],"parameters":{"max_batch_rows":32}}'
    )


def test_an_error_reply_decodes_as_an_error_reply() -> None:
    body = encode_error("r1", "message_too_large", "too big", CONTENT_TYPE_JSON)
    assert decode_metadata(body, CONTENT_TYPE_JSON) == ErrorReply(id="r1", code="message_too_large", message="too big")


@pytest.mark.parametrize("body", [b"", b"[1, 2]", b'{"outputs": []}', b"\xff" * 10, b"[" * 100_000])
def test_a_body_that_is_not_metadata_raises_bad_encoding(body: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_metadata(body, CONTENT_TYPE_JSON)
    assert caught.value.code == "bad_encoding"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({HEADER_KIND: KIND_METADATA}, True),
        ({HEADER_KIND: KIND_METADATA.encode()}, True),
        ({HEADER_KIND: "inference"}, False),
        ({HEADER_KIND: 1}, False),
        ({}, False),
        (None, False),
    ],
)
def test_only_the_metadata_kind_marks_a_metadata_request(headers: dict[str, object] | None, expected: bool) -> None:
    assert is_metadata_request(headers) is expected


def test_a_tensor_model_lists_its_tensors_with_free_dimensions_as_minus_1_and_no_text_limits(tmp_path: Path) -> None:
    settings = Settings(model=mlp_model(tmp_path / "mlp.onnx", width=16, hidden=8, layers=1), max_batch=32)
    metadata = model_metadata(load_pipeline(settings.model_config), settings)
    assert (metadata.name, metadata.versions, metadata.platform) == ("mlp", ["1"], "onnxruntime_onnx")
    assert metadata.inputs == [TensorMetadata(name="x", datatype="FP32", shape=[-1, 16])]
    assert metadata.outputs == [TensorMetadata(name="y", datatype="FP32", shape=[-1, 8])]
    assert metadata.parameters["max_batch_rows"] == 32
    assert "max_text_bytes" not in metadata.parameters


def test_a_text_model_names_its_text_limits(tmp_path: Path) -> None:
    folder = text_model_folder(tmp_path / "text", dim=4)  # the model takes up to 64 positions
    settings = Settings(model=folder, max_text_bytes=1000, max_text_length=20)
    metadata = model_metadata(load_pipeline(settings.model_config), settings)
    assert metadata.inputs == [TensorMetadata(name="text", datatype="BYTES", shape=[-1])]
    assert metadata.outputs == [TensorMetadata(name="embedding", datatype="FP32", shape=[-1, 4])]
    assert metadata.parameters["max_text_bytes"] == 1000
    assert metadata.parameters["max_text_tokens"] == 20  # texts are truncated at WORKER_MAX_TEXT_LENGTH tokens


def test_a_routed_text_model_takes_its_version_from_the_settings_not_its_manifest(tmp_path: Path) -> None:
    folder = text_model_folder(tmp_path / "text")  # the manifest has no version: "1"
    routed = Settings.from_env({}, model=folder, model_name="tiny", model_version="7", traffic_weight=10)
    assert load_pipeline(routed.model_config).version == "7"
    assert model_metadata(load_pipeline(routed.model_config), routed).versions == ["7"]
    assert load_pipeline(Settings(model=folder).model_config).version == "1"


def test_the_reply_body_follows_the_request_encoding(tmp_path: Path) -> None:
    settings = Settings(model=mlp_model(tmp_path / "mlp.onnx", width=16, hidden=8, layers=1))
    replies = MetadataReplies(load_pipeline(settings.model_config), settings)
    body, content_type = replies.body(CONTENT_TYPE_MSGPACK)
    assert content_type == CONTENT_TYPE_MSGPACK
    assert decode_metadata(body, content_type) == replies.metadata
    assert replies.body(None)[1] == CONTENT_TYPE_JSON
    assert replies.body("text/plain")[1] == CONTENT_TYPE_JSON
