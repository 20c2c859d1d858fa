"""Bulk job rows: parsing, packing, request ids, output lines and resuming from an output file."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import numpy as np
import pytest

from producer.bulk.jsonl import (
    BadRow,
    Packer,
    Row,
    RowErrorCode,
    batch_inputs,
    count_rows,
    error_line,
    iter_input,
    parse_datatypes,
    parse_row,
    read_output,
    result_lines,
)
from producer.bulk.signed_ids import decode_body_id, encode_body_id
from producer.wire.names import CONTENT_TYPE_MSGPACK
from producer.wire.protocol import InferReply, decode_request, encode_request


def _row(line: int, text: str) -> Row:
    parsed = parse_row(line, text.encode())
    assert isinstance(parsed, Row)
    return parsed


def test_text_row_becomes_a_bytes_scalar_under_the_text_input() -> None:
    row = _row(3, '{"id": "a", "text": "hello"}')
    assert (row.line, row.id, list(row.inputs)) == (3, "a", ["text"])
    assert row.inputs["text"].shape == ()
    assert row.inputs["text"][()] == "hello"


def test_tensor_row_uses_the_default_datatype_and_per_input_overrides() -> None:
    parsed = parse_row(1, b'{"id": 7, "inputs": {"x": [1, 2], "ids": [[3, 4]]}}', datatypes={"ids": "INT64"})
    assert isinstance(parsed, Row)
    assert parsed.id == "7"
    assert parsed.inputs["x"].dtype == np.float32
    assert parsed.inputs["ids"].dtype == np.int64
    assert parsed.inputs["ids"].shape == (1, 2)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{not json", RowErrorCode.INVALID_JSON),
        ("[1, 2]", RowErrorCode.INVALID_ROW),
        ('{"text": "no id"}', RowErrorCode.INVALID_ROW),
        ('{"id": "a"}', RowErrorCode.INVALID_ROW),
        ('{"id": "a", "text": "t", "inputs": {"x": [1]}}', RowErrorCode.INVALID_ROW),
        ('{"id": "a", "text": 5}', RowErrorCode.INVALID_ROW),
        ('{"id": "a", "inputs": []}', RowErrorCode.INVALID_ROW),
        ('{"id": "a", "inputs": {"x": [[1, 2], [3]]}}', "invalid_tensor"),
    ],
)
def test_bad_lines_become_bad_rows_with_a_code(text: str, code: str) -> None:
    parsed = parse_row(4, text.encode())
    assert isinstance(parsed, BadRow)
    assert (parsed.line, parsed.code) == (4, code)


def test_parse_datatypes_sets_default_and_per_input_types() -> None:
    assert parse_datatypes([]) == ("FP32", {})
    assert parse_datatypes(["int64", "x=FP16"]) == ("INT64", {"x": "FP16"})
    with pytest.raises(ValueError, match="BYTES"):
        parse_datatypes(["BYTES"])


def test_packer_groups_compatible_rows_up_to_the_limit() -> None:
    packer = Packer(3)
    rows = [_row(i, f'{{"id": "r{i}", "inputs": {{"x": [{i}, 0]}}}}') for i in range(7)]
    groups = [g for r in rows for g in packer.add(r)]
    last = packer.flush()
    assert last is not None
    groups.append(last)
    assert [[r.id for r in g] for g in groups] == [["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6"]]
    assert packer.flush() is None


def test_packer_sends_a_row_of_another_shape_on_its_own() -> None:
    packer = Packer(10)
    a = _row(1, '{"id": "a", "inputs": {"x": [1, 2]}}')
    odd = _row(2, '{"id": "odd", "inputs": {"x": [1, 2, 3]}}')
    b = _row(3, '{"id": "b", "inputs": {"x": [3, 4]}}')
    assert packer.add(a) == []
    assert packer.add(odd) == [[a]]
    assert packer.add(b) == [[odd]]
    assert packer.flush() == [b]


def test_packer_with_one_row_per_message_emits_every_row() -> None:
    packer = Packer(1)
    a = _row(1, '{"id": "a", "text": "x"}')
    b = _row(2, '{"id": "b", "inputs": {"x": [1]}}')
    assert packer.add(a) == [[a]]
    assert packer.add(b) == [[b]]


def test_batch_inputs_stack_rows_into_a_request_the_worker_decodes() -> None:
    rows = [_row(1, '{"id": "a", "text": "one"}'), _row(2, '{"id": "b", "text": "two"}')]
    body = encode_request(batch_inputs(rows), CONTENT_TYPE_MSGPACK, request_id=encode_body_id("job.n.1", rows))
    request = decode_request(body, CONTENT_TYPE_MSGPACK)
    assert request.inputs["text"].tolist() == ["one", "two"]
    assert decode_body_id(request.id) == [(1, "a"), (2, "b")]


def test_body_id_round_trips_awkward_row_ids() -> None:
    rows = [_row(9, json.dumps({"id": 'we:ird "id" [1]', "text": "t"}))]
    assert decode_body_id(encode_body_id("j.n.1", rows)) == [(9, 'we:ird "id" [1]')]
    assert decode_body_id("plain-correlation-id") is None
    assert decode_body_id("x:not json") is None
    with pytest.raises(ValueError, match="must not contain"):
        encode_body_id("a:b", rows)


def test_result_lines_split_outputs_per_row() -> None:
    reply = InferReply(
        id="i", model_name="m", model_version=None, outputs={"y": np.arange(6, dtype=np.float32).reshape(3, 2)}
    )
    lines = result_lines([(1, "a"), (2, "b"), (4, "c")], reply)
    assert [json.loads(line) for line in lines] == [
        {"id": "a", "line": 1, "outputs": {"y": [0.0, 1.0]}},
        {"id": "b", "line": 2, "outputs": {"y": [2.0, 3.0]}},
        {"id": "c", "line": 4, "outputs": {"y": [4.0, 5.0]}},
    ]
    with pytest.raises(ValueError, match="expected 2 rows"):
        result_lines([(1, "a"), (2, "b")], reply)


def test_read_output_knows_rows_by_id_and_rejected_lines_by_number(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(
        b'{"id": "a", "line": 1, "outputs": {"y": [1]}}\n'
        + error_line(2, None, RowErrorCode.INVALID_JSON, "bad")
        + error_line(3, "b", "wrong_shape", "bad shape")
        + error_line(5, "a", RowErrorCode.DUPLICATE_ID, "again")
    )
    state = read_output(out)
    assert state.done_ids == {"a", "b"}
    assert state.done_lines == {2, 5}
    assert (state.rows, state.failed) == (4, 3)


def test_read_output_cuts_a_torn_last_line(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    good = b'{"id": "a", "line": 1, "outputs": {"y": [1]}}\n'
    out.write_bytes(good + b'{"id": "b", "line": 2, "outp')
    state = read_output(out)
    assert state.done_ids == {"a"}
    assert out.read_bytes() == good


def test_read_output_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_output(tmp_path / "none.jsonl").rows == 0


def test_input_iteration_skips_blank_lines_and_keeps_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a", "text": "x"}\n\n  \n{"id": "b", "text": "y"}')
    assert [n for n, _ in iter_input(path)] == [1, 4]
    assert count_rows(path) == 2


def test_error_line_is_one_json_object() -> None:
    assert msgspec.json.decode(error_line(3, None, "invalid_json", "m")) == {
        "id": None,
        "line": 3,
        "error": {"code": "invalid_json", "message": "m"},
    }
