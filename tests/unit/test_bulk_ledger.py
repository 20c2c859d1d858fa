"""The bulk job's row ledger without a broker: what is sent, what is written, in which order, and when a run ends."""

from __future__ import annotations

import json
from typing import Any

import pytest

from producer.bulk.jsonl import BadRow, OutputState, Row, RowErrorCode, parse_row
from producer.bulk.ledger import RowLedger
from producer.bulk.options import BulkSummary, Order


class _Recorder:
    """What the ledger hands on: written lines, freed window slots, the end of the run, progress."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.units_done = 0
        self.finished = 0
        self.progress: list[tuple[int, int]] = []

    def write(self, text: bytes) -> None:
        self.lines.append(json.loads(text))

    def unit_done(self) -> None:
        self.units_done += 1

    def on_finished(self) -> None:
        self.finished += 1

    def start(self, total_rows: int) -> None:
        pass

    def advance(self, rows: int, failed: int) -> None:
        self.progress.append((rows, failed))

    @property
    def ids(self) -> list[object]:
        return [line["id"] for line in self.lines]


def _ledger(order: Order = "arrival") -> tuple[RowLedger, _Recorder, BulkSummary]:
    recorder, summary = _Recorder(), BulkSummary(job_id="job")
    ledger = RowLedger(
        order,
        summary,
        write=recorder.write,
        unit_done=recorder.unit_done,
        finished=recorder.on_finished,
        progress=recorder,
    )
    return ledger, recorder, summary


def _row(line: int, row_id: str) -> Row | BadRow:
    return parse_row(line, json.dumps({"id": row_id, "text": f"text {line}"}).encode())


def _result(row_id: str) -> bytes:
    return json.dumps({"id": row_id, "outputs": {"y": [1.0]}}).encode() + b"\n"


def _send(ledger: RowLedger, *rows: Row | BadRow) -> list[Row]:
    """Admit ``rows`` and return those to send, as one request."""
    to_send = [r for r in (ledger.admit(row) for row in rows) if r is not None]
    if to_send:
        ledger.start_unit(to_send)
    return to_send


def test_admitted_rows_are_sent_and_written_as_their_replies_arrive() -> None:
    ledger, out, summary = _ledger()
    sent = _send(ledger, _row(1, "a"), _row(2, "b"))
    assert [r.id for r in sent] == ["a", "b"]
    ledger.resolve("b", _result("b"), None, earlier_run=False)
    ledger.resolve("a", _result("a"), None, earlier_run=False)
    assert out.ids == ["b", "a"]
    assert out.units_done == 1
    assert summary.written == 2
    assert summary.failed == 0
    assert out.progress == [(1, 0), (1, 0)]


def test_the_run_finishes_once_the_scan_is_over_and_every_row_is_written() -> None:
    ledger, out, _ = _ledger()
    _send(ledger, _row(1, "a"))
    ledger.end_scan()
    assert out.finished == 0, "row a awaits its reply"
    ledger.resolve("a", _result("a"), None, earlier_run=False)
    assert out.finished == 1


def test_while_scanning_the_run_does_not_finish_even_with_nothing_unwritten() -> None:
    ledger, out, _ = _ledger()
    _send(ledger, _row(1, "a"))
    ledger.resolve("a", _result("a"), None, earlier_run=False)
    assert ledger.unwritten == 0
    assert out.finished == 0


def test_input_order_holds_a_row_until_the_rows_before_it_are_written() -> None:
    ledger, out, _ = _ledger("input")
    _send(ledger, _row(1, "a"), _row(2, "b"), _row(3, "c"))
    ledger.resolve("c", _result("c"), None, earlier_run=False)
    ledger.resolve("b", _result("b"), None, earlier_run=False)
    assert out.lines == []
    ledger.resolve("a", _result("a"), None, earlier_run=False)
    assert out.ids == ["a", "b", "c"]


def test_rows_the_output_already_holds_are_neither_sent_nor_written() -> None:
    ledger, out, _ = _ledger()
    ledger.restore(OutputState(done_ids={"a"}, done_lines={3}, rows=2))
    bad = parse_row(3, b"{not json")
    assert [r.id for r in _send(ledger, _row(1, "a"), _row(2, "b"), bad)] == ["b"]
    ledger.resolve("a", _result("a"), None, earlier_run=True)  # a late reply to a row already written
    assert out.lines == []


def test_a_bad_row_and_a_repeated_id_are_written_as_errors_without_a_request() -> None:
    ledger, out, summary = _ledger()
    sent = _send(ledger, _row(1, "a"), parse_row(2, b"[1, 2]"), _row(3, "a"))
    assert [r.id for r in sent] == ["a"]
    assert [line["error"]["code"] for line in out.lines] == [RowErrorCode.INVALID_ROW, RowErrorCode.DUPLICATE_ID]
    assert summary.failed == 2
    assert summary.errors_by_code == {"invalid_row": 1, "duplicate_id": 1}
    assert out.progress == [(1, 1), (1, 1)]


def test_a_row_is_written_once_however_often_it_is_answered() -> None:
    ledger, out, _ = _ledger()
    _send(ledger, _row(1, "a"))
    ledger.resolve("a", _result("a"), None, earlier_run=False)
    ledger.resolve("a", _result("a"), None, earlier_run=True)
    ledger.resolve("a", b'{"id": "a", "error": {}}\n', "internal", earlier_run=False)
    assert out.ids == ["a"]


def test_only_unanswered_rows_need_a_request() -> None:
    ledger, _, _ = _ledger("input")
    rows = [r for r in (ledger.admit(_row(i, f"r{i}")) for i in (1, 2, 3)) if r is not None]
    ledger.resolve("r2", _result("r2"), None, earlier_run=True)
    assert [r.id for r in ledger.unanswered(rows)] == ["r1", "r3"]


def test_an_earlier_runs_reply_before_the_scan_is_written_at_once_in_arrival_order() -> None:
    ledger, out, summary = _ledger("arrival")
    ledger.resolve("b", _result("b"), None, earlier_run=True)
    assert out.ids == ["b"]
    assert summary.collected == 1
    assert [r.id for r in _send(ledger, _row(1, "a"), _row(2, "b"))] == ["a"]


def test_an_earlier_runs_reply_before_the_scan_waits_for_its_row_in_input_order() -> None:
    ledger, out, _ = _ledger("input")
    ledger.resolve("b", _result("b"), None, earlier_run=True)
    assert out.lines == []
    sent = _send(ledger, _row(1, "a"), _row(2, "b"))
    assert [r.id for r in sent] == ["a"], "b is answered: it needs no request"
    ledger.resolve("a", _result("a"), None, earlier_run=False)
    assert out.ids == ["a", "b"]


@pytest.mark.parametrize("order", ["arrival", "input"])
def test_a_reply_of_this_run_for_an_unknown_row_is_ignored(order: Order) -> None:
    ledger, out, _ = _ledger(order)
    ledger.resolve("ghost", _result("ghost"), None, earlier_run=False)
    assert out.lines == []
    assert ledger.unwritten == 0


def test_the_window_slot_is_freed_when_the_last_row_of_its_request_is_written() -> None:
    ledger, out, _ = _ledger()
    _send(ledger, _row(1, "a"), _row(2, "b"))
    _send(ledger, _row(3, "c"))
    ledger.resolve("a", _result("a"), None, earlier_run=False)
    assert out.units_done == 0
    ledger.resolve("c", _result("c"), None, earlier_run=False)
    assert out.units_done == 1
    ledger.resolve("b", b'{"id": "b", "error": {"code": "x"}}\n', "x", earlier_run=False)
    assert out.units_done == 2
