"""The text pipeline's pure parts: tokenizing, truncation, padding per batch, length grouping, pooling.

No real model: a tiny word-level tokenizer built here stands in for the model's tokenizer, and a lookup
table stands in for the encoder where a hidden state is needed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from producer.wire.errors import ProtocolError
from producer.wire.protocol import ErrorCode
from tests.support.models import make_tokenizer
from worker.pipelines.manifest import MANIFEST_FILE, ManifestError
from worker.pipelines.text_steps import (
    TextPipeline,
    group_by_length,
    l2_normalize,
    mean_pool,
    pad_rows,
    padded_tokens,
    texts_from_tensor,
    token_counts,
)

PAD, UNK, CLS, SEP = 0, 1, 2, 3
DIM = 4


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    make_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "model.onnx").write_bytes(b"")  # the pipeline never opens it
    manifest = {
        "format": 1,
        "pipeline": "text-embedding",
        "name": "tiny",
        "max_length": 6,
        "max_positions": 12,
        "dim": DIM,
    }
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    return tmp_path


@pytest.fixture
def pipeline(model_folder: Path) -> TextPipeline:
    return TextPipeline.from_folder(model_folder)


def fake_encoder(feeds: Mapping[str, npt.NDArray[np.int64]]) -> npt.NDArray[np.float32]:
    """A hidden state that depends only on each token's id, so padding cannot change a row's embedding."""
    ids = feeds["input_ids"]
    table = np.arange(64 * DIM, dtype=np.float32).reshape(64, DIM) % 7 - 3
    return table[ids]


# ---------------------------------------------------------------------------------------------
# Tokenizing and truncation


def test_tokenize_adds_special_tokens_and_does_not_pad(pipeline: TextPipeline) -> None:
    rows = pipeline.tokenize(["the fox", "the quick brown fox"])
    assert [r.tolist() for r in rows] == [[CLS, 4, 7, SEP], [CLS, 4, 5, 6, 7, SEP]]
    assert all(r.dtype == np.int64 for r in rows)


def test_empty_string_is_just_the_special_tokens(pipeline: TextPipeline) -> None:
    assert [r.tolist() for r in pipeline.tokenize([""])] == [[CLS, SEP]]


def test_token_counts_are_the_unpadded_lengths(pipeline: TextPipeline) -> None:
    assert token_counts(pipeline.tokenize(["", "the fox", "the quick brown fox jumps over lazy dog"])) == [2, 4, 6]


def test_tokenize_of_no_texts_is_empty(pipeline: TextPipeline) -> None:
    assert pipeline.tokenize([]) == []


def test_unknown_and_unicode_words_tokenize(pipeline: TextPipeline) -> None:
    assert pipeline.tokenize(["café 東京 zebra"])[0].tolist() == [CLS, 12, 13, UNK, SEP]


def test_truncates_at_manifest_max_length_special_tokens_included(pipeline: TextPipeline) -> None:
    row = pipeline.tokenize(["the quick brown fox jumps over lazy dog"])[0]
    assert row.tolist() == [CLS, 4, 5, 6, 7, SEP]
    assert pipeline.max_length == 6


def test_max_length_override(model_folder: Path) -> None:
    pipeline = TextPipeline.from_folder(model_folder, max_length=10)
    assert len(pipeline.tokenize(["the quick brown fox jumps over lazy dog"])[0]) == 10


@pytest.mark.parametrize("max_length", [2, 13])
def test_max_length_out_of_range_is_refused(model_folder: Path, max_length: int) -> None:
    with pytest.raises(ManifestError, match="max_length"):
        TextPipeline.from_folder(model_folder, max_length=max_length)


# ---------------------------------------------------------------------------------------------
# Padding and feeds


def test_pad_rows_pads_to_the_longest_row_of_the_batch() -> None:
    rows = [np.array([2, 5, 3]), np.array([2, 3]), np.array([2, 6, 7, 8, 3])]
    ids, mask = pad_rows(rows, pad_id=9)
    assert ids.tolist() == [[2, 5, 3, 9, 9], [2, 3, 9, 9, 9], [2, 6, 7, 8, 3]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ids.dtype == mask.dtype == np.int64


def test_pad_rows_needs_a_row() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        pad_rows([])


def test_feeds_are_padded_to_the_batch_not_to_max_length(pipeline: TextPipeline) -> None:
    batch = pipeline.pad(pipeline.tokenize(["the", "the fox"]))
    feeds = pipeline.feeds(batch)
    assert set(feeds) == {"input_ids", "attention_mask", "token_type_ids"}
    assert feeds["input_ids"].shape == (2, 4)
    assert feeds["input_ids"].tolist() == [[CLS, 4, SEP, PAD], [CLS, 4, 7, SEP]]
    assert feeds["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert feeds["token_type_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
    assert all(v.dtype == np.int64 for v in feeds.values())


def test_feeds_carry_only_the_inputs_the_model_declares(model_folder: Path) -> None:
    pipeline = TextPipeline.from_folder(model_folder, model_inputs=["attention_mask", "input_ids"])
    feeds = pipeline.feeds(pipeline.pad(pipeline.tokenize(["fox"])))
    assert sorted(feeds) == ["attention_mask", "input_ids"]


@pytest.mark.parametrize("inputs", [["attention_mask"], ["input_ids", "pixel_values"]])
def test_model_inputs_that_do_not_fit_a_text_model_are_refused(model_folder: Path, inputs: list[str]) -> None:
    with pytest.raises(ManifestError, match="do not fit a text model"):
        TextPipeline.from_folder(model_folder, model_inputs=inputs)


def test_a_model_without_the_hidden_state_output_is_refused(model_folder: Path) -> None:
    with pytest.raises(ManifestError, match="hidden_state"):
        TextPipeline.from_folder(model_folder, model_outputs=["logits"])


# ---------------------------------------------------------------------------------------------
# Pooling


def test_mean_pool_ignores_padding() -> None:
    hidden = np.array([[[1, 2], [3, 4], [100, 100]], [[5, 6], [7, 8], [9, 10]]], dtype=np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    assert pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, [[2, 3], [7, 8]])


def test_mean_pool_of_a_row_without_tokens_is_zero() -> None:
    pooled = mean_pool(np.ones((1, 2, 3), dtype=np.float32), np.zeros((1, 2), dtype=np.int64))
    np.testing.assert_array_equal(pooled, np.zeros((1, 3)))


def test_l2_normalize_gives_unit_rows_and_keeps_zero_rows_finite() -> None:
    vectors = np.array([[3, 4], [0, 0]], dtype=np.float32)
    np.testing.assert_allclose(l2_normalize(vectors), [[0.6, 0.8], [0, 0]])


def test_pool_gives_normalized_float32_embeddings(pipeline: TextPipeline) -> None:
    batch = pipeline.pad(pipeline.tokenize(["the quick fox", ""]))
    embeddings = pipeline.pool(fake_encoder(pipeline.feeds(batch)), batch)
    assert embeddings.shape == (2, DIM)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, rtol=1e-6)


def test_pool_refuses_a_hidden_state_of_the_wrong_shape(pipeline: TextPipeline) -> None:
    batch = pipeline.pad(pipeline.tokenize(["the fox"]))
    with pytest.raises(ValueError, match="hidden state has shape"):
        pipeline.pool(np.zeros((1, 4, DIM + 1), dtype=np.float32), batch)


def test_cls_pooling_and_no_normalization(model_folder: Path) -> None:
    manifest = json.loads((model_folder / MANIFEST_FILE).read_text())
    manifest |= {"pooling": "cls", "normalize": False}
    (model_folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    pipeline = TextPipeline.from_folder(model_folder)
    batch = pipeline.pad(pipeline.tokenize(["the fox"]))
    hidden = fake_encoder(pipeline.feeds(batch))
    np.testing.assert_array_equal(pipeline.pool(hidden, batch), hidden[:, 0, :])


# ---------------------------------------------------------------------------------------------
# End to end with a stand-in encoder


TEXTS = ["the", "the quick brown fox jumps over lazy dog", "", "fox", "café 東京", "lazy dog", "the fox jumps"]


def test_embed_keeps_text_order_and_padding_does_not_change_a_row(pipeline: TextPipeline) -> None:
    alone = np.stack([pipeline.embed([t], fake_encoder)[0] for t in TEXTS])
    grouped = pipeline.embed(TEXTS, fake_encoder, max_rows=3, group=True)
    in_order = pipeline.embed(TEXTS, fake_encoder, max_rows=3, group=False)
    np.testing.assert_allclose(grouped, alone, rtol=1e-6)
    np.testing.assert_allclose(in_order, alone, rtol=1e-6)


def test_embed_runs_batches_of_at_most_max_rows_padded_to_their_longest_row(pipeline: TextPipeline) -> None:
    shapes: list[tuple[int, ...]] = []

    def run(feeds: Mapping[str, npt.NDArray[np.int64]]) -> npt.NDArray[np.float32]:
        shapes.append(feeds["input_ids"].shape)
        return fake_encoder(feeds)

    pipeline.embed(TEXTS, run, max_rows=3)
    assert [s[0] for s in shapes] == [3, 2, 2]
    lengths = sorted(len(r) for r in pipeline.tokenize(TEXTS))  # [2, 3, 3, 4, 4, 5, 6]
    assert [s[1] for s in shapes] == [lengths[2], lengths[4], lengths[6]]


# ---------------------------------------------------------------------------------------------
# Grouping by length


def check_partition(groups: list[list[int]], count: int) -> None:
    assert sorted(i for g in groups for i in g) == list(range(count))
    assert all(groups)


def test_group_by_length_puts_similar_lengths_together() -> None:
    lengths = [60, 10, 61, 12, 59, 11, 62, 9]
    groups = group_by_length(lengths, max_rows=4)
    check_partition(groups, len(lengths))
    assert groups == [[7, 1, 5, 3], [4, 0, 2, 6]]


def test_group_by_length_reduces_padding_on_a_mixed_batch() -> None:
    lengths = [10, 60] * 32
    grouped = group_by_length(lengths, max_rows=32)
    in_order = [list(range(0, 32)), list(range(32, 64))]
    assert padded_tokens(lengths, grouped) == 32 * 10 + 32 * 60
    assert padded_tokens(lengths, in_order) == 64 * 60


def test_group_by_length_makes_as_few_groups_as_possible_of_nearly_equal_size() -> None:
    groups = group_by_length(list(range(130)), max_rows=64)
    assert [len(g) for g in groups] == [44, 43, 43]


def test_group_by_length_keeps_equal_lengths_in_their_order() -> None:
    assert group_by_length([5, 5, 5, 5], max_rows=2) == [[0, 1], [2, 3]]


def test_group_by_length_respects_a_padded_token_budget() -> None:
    lengths = [4, 4, 4, 8, 8, 100]
    groups = group_by_length(lengths, max_rows=6, max_padded_tokens=16)
    check_partition(groups, len(lengths))
    assert groups == [[0, 1, 2], [3, 4], [5]]
    for g in groups[:-1]:
        assert len(g) * max(lengths[i] for i in g) <= 16


def test_group_by_length_of_nothing_is_nothing() -> None:
    assert group_by_length([], max_rows=8) == []


@pytest.mark.parametrize(
    ("lengths", "kwargs", "match"),
    [
        ([1], {"max_rows": 0}, "max_rows"),
        ([1], {"max_rows": 1, "max_padded_tokens": 0}, "max_padded_tokens"),
        ([-1], {"max_rows": 1}, "negative"),
    ],
)
def test_group_by_length_refuses_bad_arguments(lengths: list[int], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        group_by_length(lengths, **kwargs)


# ---------------------------------------------------------------------------------------------
# Text inputs from request tensors


def bytes_tensor(items: list[Any], shape: tuple[int, ...] | None = None) -> npt.NDArray[Any]:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape or (len(items),))


def test_texts_from_tensor_accepts_strings_and_utf8_bytes() -> None:
    assert texts_from_tensor(bytes_tensor(["a", "café".encode()])) == ["a", "café"]
    assert texts_from_tensor(bytes_tensor(["a", "b"], (2, 1))) == ["a", "b"]


@pytest.mark.parametrize(
    ("array", "code"),
    [
        (np.zeros(2, dtype=np.float32), ErrorCode.WRONG_DATATYPE),
        (bytes_tensor(["a", "b", "c", "d"], (2, 2)), ErrorCode.WRONG_SHAPE),
        (bytes_tensor([1, "b"]), ErrorCode.INVALID_TENSOR),
        (bytes_tensor([b"\xff\xfe"]), ErrorCode.INVALID_TENSOR),
    ],
)
def test_texts_from_tensor_refuses_what_is_not_one_string_per_row(array: npt.NDArray[Any], code: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        texts_from_tensor(array, name="text")
    assert caught.value.code == code
    assert "'text'" in caught.value.message
