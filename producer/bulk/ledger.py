"""The rows of one bulk-job run, from the input scan to the output file: admitted, pending, resolved, written.

Owns :class:`RowLedger`: which rows the output already holds (a resumed run skips them), which were sent and
await a reply, which have their line (a result or an error) and wait for their turn (``--order input``), and
when the run is done (the scan is over and every admitted row is written). It decides each row's fate and
hands the lines to write, the flow-control window's releases and the progress to the callbacks it is given.

Used by the bulk job (:mod:`producer.bulk.job`: scan, send) and its reply handling (:mod:`producer.bulk.replies`:
resolve). Pure: no broker, no file; unit-tested on its own (``tests/unit/test_bulk_ledger.py``).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence

from producer.bulk.jsonl import LINE_KEYED_CODES, BadRow, OutputState, Row, RowErrorCode, error_line
from producer.bulk.options import BulkSummary, Order, ProgressSink

__all__ = ["RowLedger", "Slot", "Unit"]


@dataclasses.dataclass(slots=True)
class Unit:
    """One slot of the flow-control window: a packed request and its splits, until all its rows are written."""

    remaining: int


@dataclasses.dataclass(slots=True)
class Slot:
    """A row that is admitted and not yet written."""

    line: int
    id: str | None
    keyed: bool
    """Known by id in the output (False for rows the producer rejected)."""
    unit: Unit | None = None
    text: bytes | None = None
    code: str | None = None


class RowLedger:
    """The fate of every row of one run.

    Args:
        order: ``arrival`` writes a row as soon as it has its line; ``input`` holds it until the rows before it
            are written.
        summary: counts ``written``, ``failed``, ``errors_by_code`` and ``collected`` rows.
        write: writes one output line (the job's output file).
        unit_done: a request's rows are all written (the job frees one slot of its window).
        finished: the scan is over and every admitted row is written (called once each time that holds).
        progress: told of each row written.
    """

    def __init__(
        self,
        order: Order,
        summary: BulkSummary,
        *,
        write: Callable[[bytes], None],
        unit_done: Callable[[], None],
        finished: Callable[[], None],
        progress: ProgressSink | None = None,
    ) -> None:
        self.order = order
        self.summary = summary
        self._write_line = write
        self._unit_done = unit_done
        self._finished = finished
        self._progress = progress
        self._done_ids: set[str] = set()
        self._done_lines: set[int] = set()
        self._seen: set[str] = set()
        self._pending: dict[str, Slot] = {}
        self._order: collections.deque[Slot] = collections.deque()
        self._early: dict[str, tuple[bytes, str | None]] = {}
        self.unwritten = 0
        """Rows admitted and not yet written."""
        self.scanning = True

    def restore(self, state: OutputState) -> None:
        """Take what the output already holds: those rows are neither sent nor written again."""
        self._done_ids, self._done_lines = set(state.done_ids), set(state.done_lines)

    # ------------------------------------------------------------------------------------------
    # The scan

    def admit(self, parsed: Row | BadRow) -> Row | None:
        """Admit a scanned row; returns it when it must be sent, else None.

        None: the output already has it, or it is written (or waits its turn) without a request: a bad
        row, a repeated id, or a row an earlier run's reply answered before the scan reached it.
        """
        slot = self._slot(parsed)
        if slot is None:
            return None
        if isinstance(parsed, BadRow):
            self._add_resolved(slot, error_line(parsed.line, parsed.id, parsed.code, parsed.message), parsed.code)
            return None
        if slot.text is not None:
            self._add_resolved(slot, slot.text, slot.code)
            return None
        assert slot.id is not None
        self.unwritten += 1
        self._pending[slot.id] = slot
        if self.order == "input":
            self._order.append(slot)
        return parsed

    def end_scan(self) -> None:
        """The whole input is admitted: the run finishes once every admitted row is written."""
        self.scanning = False
        self._early.clear()
        self._check_finished()

    def _slot(self, parsed: Row | BadRow) -> Slot | None:
        """The slot of a scanned row, or None when the output already has it."""
        keyed = parsed.id is not None and not (isinstance(parsed, BadRow) and parsed.code in LINE_KEYED_CODES)
        if parsed.line in self._done_lines:
            return None
        if not keyed:
            return Slot(parsed.line, parsed.id, keyed=False)
        assert parsed.id is not None
        if parsed.id in self._seen:
            slot = Slot(parsed.line, parsed.id, keyed=False)
            message = f"id {parsed.id!r} appeared on an earlier line; only the first is sent"
            slot.text = error_line(parsed.line, parsed.id, RowErrorCode.DUPLICATE_ID, message)
            slot.code = RowErrorCode.DUPLICATE_ID
            return slot
        self._seen.add(parsed.id)
        if parsed.id in self._done_ids:
            return None
        slot = Slot(parsed.line, parsed.id, keyed=True)
        early = self._early.pop(parsed.id, None)
        if early is not None:
            slot.text, slot.code = early
        return slot

    def _add_resolved(self, slot: Slot, text: bytes, code: str | None) -> None:
        slot.text, slot.code = text, code
        self.unwritten += 1
        if self.order == "input":
            self._order.append(slot)
            self._write_ready()
        else:
            self._write(slot)

    # ------------------------------------------------------------------------------------------
    # Requests

    def unanswered(self, rows: Sequence[Row]) -> list[Row]:
        """Those of ``rows`` still waiting for their line (others were answered meanwhile, or written)."""
        return [r for r in rows if (s := self._pending.get(r.id)) is not None and s.text is None]

    def start_unit(self, rows: Sequence[Row]) -> None:
        """``rows`` (unanswered) leave in one request: they hold one slot of the window until all are written."""
        unit = Unit(remaining=len(rows))
        for row in rows:
            self._pending[row.id].unit = unit

    def resolve(self, row_id: str, text: bytes, code: str | None, *, earlier_run: bool) -> None:
        """A row has its line (a result, or an error when ``code``); write it unless the output already has it.

        Args:
            earlier_run: the line answers a request an earlier run sent (collected from the results queue); such
                a row may not be scanned yet: it is written now (``arrival``) or kept until the scan reaches it.
        """
        if row_id in self._done_ids:
            return
        slot = self._pending.get(row_id)
        if slot is None:
            if not earlier_run:
                return
            if self.order == "arrival":
                # Not scanned yet: write now; the scan will find the id done and skip it.
                slot = Slot(0, row_id, keyed=True, text=text, code=code)
                self.unwritten += 1
                self.summary.collected += 1
                self._write(slot)
            elif self.scanning:
                self._early[row_id] = (text, code)
            return
        if slot.text is not None:
            return
        slot.text, slot.code = text, code
        if earlier_run:
            self.summary.collected += 1
        if self.order == "input":
            self._write_ready()
        else:
            self._write(slot)

    # ------------------------------------------------------------------------------------------
    # Writing

    def _write_ready(self) -> None:
        while self._order and self._order[0].text is not None:
            self._write(self._order.popleft())

    def _write(self, slot: Slot) -> None:
        assert slot.text is not None
        self._write_line(slot.text)
        self.unwritten -= 1
        if slot.keyed:
            assert slot.id is not None
            self._done_ids.add(slot.id)
            self._pending.pop(slot.id, None)
        self.summary.written += 1
        failed = slot.code is not None
        if failed:
            self.summary.failed += 1
            self.summary.errors_by_code[str(slot.code)] += 1
        if slot.unit is not None:
            slot.unit.remaining -= 1
            if slot.unit.remaining == 0:
                self._unit_done()
        if self._progress is not None:
            self._progress.advance(1, int(failed))
        self._check_finished()

    def _check_finished(self) -> None:
        if not self.scanning and self.unwritten == 0:
            self._finished()
