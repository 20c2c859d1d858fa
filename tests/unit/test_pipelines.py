"""The pipelines' request checks on real ONNX Runtime sessions of tiny models: zero-row requests, text
byte bounds, clipped echoes, and outputs that do not depend on a request's batch neighbours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from producer.wire.errors import CLIP_CHARS, ProtocolError
from producer.wire.names import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK
from producer.wire.protocol import ErrorCode, InferRequest, decode_request, encode_request
from tests.support.models import affine_model, text_model_folder
from worker.pipelines.tensor import TensorPipeline, load_pipeline
from worker.pipelines.text import TextEmbeddingPipeline
from worker.settings import Settings

MAX_ROWS = 8


@pytest.fixture(scope="module")
def tensor_pipeline(tmp_path_factory: pytest.TempPathFactory) -> TensorPipeline:
    model = affine_model(tmp_path_factory.mktemp("affine") / "affine.onnx")
    return TensorPipeline.load(model, Settings(model=model).model_config)


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return text_model_folder(tmp_path_factory.mktemp("text"))


@pytest.fixture
def text_pipeline(text_folder: Path) -> TextEmbeddingPipeline:
    pipeline = load_pipeline(Settings(model=text_folder, max_text_bytes=64).model_config)
    assert isinstance(pipeline, TextEmbeddingPipeline)
    return pipeline


def texts(*items: Any) -> npt.NDArray[Any]:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array


def text_request(*items: Any) -> InferRequest:
    return InferRequest(id="t", inputs={"text": texts(*items)})


# ---------------------------------------------------------------------------------------------
# Zero rows: refused with wrong_shape, whatever the batch would have been


@pytest.mark.parametrize("content_type", [CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK])
def test_a_tensor_request_with_zero_rows_is_refused(tensor_pipeline: TensorPipeline, content_type: str) -> None:
    body = encode_request({"x": np.zeros((0, 4), dtype=np.float32)}, content_type)
    with pytest.raises(ProtocolError) as caught:
        tensor_pipeline.prepare(decode_request(body, content_type), max_rows=MAX_ROWS)
    assert caught.value.code == ErrorCode.WRONG_SHAPE
    assert "0 rows" in caught.value.message


@pytest.mark.parametrize("shape", [(0,), (0, 1)])
def test_a_text_request_with_zero_texts_is_refused(text_pipeline: TextEmbeddingPipeline, shape: tuple[int]) -> None:
    request = InferRequest(id="t", inputs={"text": np.empty(shape, dtype=object)})
    with pytest.raises(ProtocolError) as caught:
        text_pipeline.prepare(request, max_rows=MAX_ROWS)
    assert caught.value.code == ErrorCode.WRONG_SHAPE
    assert "0 texts" in caught.value.message


def test_tensor_outputs_are_the_same_alone_and_batched(tensor_pipeline: TensorPipeline) -> None:
    rng = np.random.default_rng(0)
    requests = [
        tensor_pipeline.prepare(
            InferRequest(id=str(n), inputs={"x": rng.standard_normal((n, 4)).astype(np.float32)}), max_rows=MAX_ROWS
        )
        for n in (1, 3, 2)
    ]
    batched = tensor_pipeline.run(requests)
    for request, together in zip(requests, batched, strict=True):
        [alone] = tensor_pipeline.run([request])
        assert together["y"].shape == (request.rows, 4)
        np.testing.assert_array_equal(together["y"], alone["y"])


def test_text_outputs_are_the_same_alone_and_batched(text_pipeline: TextEmbeddingPipeline) -> None:
    prepared = [
        text_pipeline.prepare(text_request(*items), max_rows=MAX_ROWS)
        for items in (["the fox"], ["the quick brown fox jumps", "dog"], ["café 東京"])
    ]
    batched = text_pipeline.run(prepared)
    for request, together in zip(prepared, batched, strict=True):
        [alone] = text_pipeline.run([request])
        assert together["embedding"].shape == (len(request.rows), 4)
        np.testing.assert_allclose(together["embedding"], alone["embedding"], rtol=1e-6)


def test_text_pieces_are_one_per_row_with_its_token_count(text_pipeline: TextEmbeddingPipeline) -> None:
    prepared = text_pipeline.prepare(text_request("the fox", "the quick brown fox jumps", "dog"), max_rows=MAX_ROWS)
    pieces = text_pipeline.pieces(prepared)
    assert [p.rows for p in pieces] == [1, 1, 1]
    assert [p.length for p in pieces] == [len(row) for row in prepared.rows]
    text_pipeline.group_by_length = False
    assert [p.length for p in text_pipeline.pieces(prepared)] == [None, None, None]


def test_rows_of_several_requests_mixed_in_one_run_equal_each_request_alone(
    text_pipeline: TextEmbeddingPipeline,
) -> None:
    first = text_pipeline.prepare(text_request("the fox", "the quick brown fox jumps", "dog"), max_rows=MAX_ROWS)
    second = text_pipeline.prepare(text_request("café 東京", "a b c d e f"), max_rows=MAX_ROWS)
    pieces = [*text_pipeline.pieces(first), *text_pipeline.pieces(second)]
    order = [4, 0, 3, 2, 1]  # any mix, as the batcher forms it
    mixed = text_pipeline.run([pieces[i].data for i in order])
    by_piece = {i: out["embedding"] for i, out in zip(order, mixed, strict=True)}
    for offset, request in ((0, first), (3, second)):
        [alone] = text_pipeline.run([request])
        rows = np.concatenate([by_piece[offset + r] for r in range(len(request.rows))])
        np.testing.assert_allclose(rows, alone["embedding"], rtol=1e-5, atol=1e-6)


def test_a_tensor_request_is_one_piece_and_splits_into_views(tensor_pipeline: TensorPipeline) -> None:
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    request = tensor_pipeline.prepare(InferRequest(id="r", inputs={"x": x}, outputs=["y"]), max_rows=MAX_ROWS)
    [piece] = tensor_pipeline.pieces(request)
    assert (piece.data, piece.rows, piece.length) == (request, 5, None)
    head, tail = tensor_pipeline.split(request, 2)
    assert (head.rows, tail.rows) == (2, 3)
    assert np.shares_memory(head.inputs["x"], x)
    assert head.outputs == tail.outputs == ["y"]
    [whole] = tensor_pipeline.run([request])
    parts = tensor_pipeline.run([tail, head])
    np.testing.assert_array_equal(np.concatenate([parts[1]["y"], parts[0]["y"]]), whole["y"])


# ---------------------------------------------------------------------------------------------
# Text byte bound


def test_load_takes_the_text_byte_bound_from_settings(text_folder: Path) -> None:
    bounded = TextEmbeddingPipeline.load(text_folder, Settings(model=text_folder, max_text_bytes=100).model_config)
    assert bounded.max_text_bytes == 100
    assert TextEmbeddingPipeline.load(text_folder, Settings(model=text_folder).model_config).max_text_bytes == 64 * 1024


@pytest.mark.parametrize(
    "item",
    [
        "x" * 65,
        "é" * 33,  # 33 characters, 66 bytes
        ("x" * 65).encode(),
    ],
)
def test_a_text_over_the_byte_bound_is_refused_before_tokenizing(
    text_pipeline: TextEmbeddingPipeline, monkeypatch: pytest.MonkeyPatch, item: str | bytes
) -> None:
    tokenized: list[object] = []
    tokenize = text_pipeline.text.tokenize

    def recording_tokenize(items: list[str]) -> object:
        tokenized.append(items)
        return tokenize(items)

    monkeypatch.setattr(text_pipeline.text, "tokenize", recording_tokenize)
    with pytest.raises(ProtocolError) as caught:
        text_pipeline.prepare(text_request("the fox", item), max_rows=MAX_ROWS)
    assert caught.value.code == ErrorCode.TEXT_TOO_LONG
    assert "row 1" in caught.value.message
    assert "64" in caught.value.message
    assert "WORKER_MAX_TEXT_BYTES" in caught.value.message
    assert tokenized == []


def test_a_text_at_the_byte_bound_is_accepted(text_pipeline: TextEmbeddingPipeline) -> None:
    prepared = text_pipeline.prepare(text_request("x" * 64, "é" * 32), max_rows=MAX_ROWS)
    assert len(prepared.rows) == 2


def test_a_lone_surrogate_is_an_invalid_tensor(text_pipeline: TextEmbeddingPipeline) -> None:
    with pytest.raises(ProtocolError) as caught:
        text_pipeline.prepare(text_request("fox \ud800"), max_rows=MAX_ROWS)
    assert caught.value.code == ErrorCode.INVALID_TENSOR


def _warm_up_shapes(pipeline: TextEmbeddingPipeline) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    session = pipeline.session

    class Recording:
        def run(self, names: list[str], feeds: dict[str, npt.NDArray[Any]]) -> Any:
            shapes.append(feeds["input_ids"].shape)
            return session.run(names, feeds)

    pipeline.session = Recording()
    pipeline.warm_up(MAX_ROWS)
    return shapes


def test_warm_up_on_a_gpu_runs_max_rows_of_the_longest_text(text_pipeline: TextEmbeddingPipeline) -> None:
    text_pipeline.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # the memory to take at start
    assert max(_warm_up_shapes(text_pipeline)) == (MAX_ROWS, text_pipeline.text.max_length)


def test_warm_up_on_the_cpu_runs_the_longest_text_once_and_a_full_batch_of_short_ones(
    text_pipeline: TextEmbeddingPipeline,
) -> None:
    shapes = _warm_up_shapes(text_pipeline)
    longest = text_pipeline.text.max_length
    assert (1, longest) in shapes
    assert any(rows == MAX_ROWS and length < longest for rows, length in shapes)
    assert (MAX_ROWS, longest) not in shapes


# ---------------------------------------------------------------------------------------------
# Echoed input is clipped


def test_a_huge_unknown_input_name_is_echoed_clipped(
    tensor_pipeline: TensorPipeline, text_pipeline: TextEmbeddingPipeline
) -> None:
    name = "\0" * 1_000_000
    for pipeline, value in ((tensor_pipeline, np.zeros((1, 4), dtype=np.float32)), (text_pipeline, texts("a"))):
        with pytest.raises(ProtocolError) as caught:
            pipeline.prepare(InferRequest(id="t", inputs={name: value}), max_rows=MAX_ROWS)
        assert caught.value.code == ErrorCode.UNKNOWN_INPUT
        assert len(caught.value.message) < 3 * CLIP_CHARS + 200


def test_a_huge_unknown_output_name_is_echoed_clipped(tensor_pipeline: TensorPipeline) -> None:
    request = InferRequest(id="t", inputs={"x": np.zeros((1, 4), dtype=np.float32)}, outputs=["y" * 1_000_000])
    with pytest.raises(ProtocolError) as caught:
        tensor_pipeline.prepare(request, max_rows=MAX_ROWS)
    assert caught.value.code == ErrorCode.UNKNOWN_OUTPUT
    assert len(caught.value.message) < 2 * CLIP_CHARS + 200
