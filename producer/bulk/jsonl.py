"""Bulk job rows: parse input JSONL, pack rows into requests, write and re-read result JSONL.

Pure functions over bytes, numpy arrays and files; nothing here talks to the broker. Used by the bulk job
(scan, pack), its ledger and reply handling (output lines) and the signed ids (a request's rows); the request
ids' format is :mod:`producer.bulk.signed_ids`'.

Input, one JSON object per line (blank lines are ignored)::

    {"id": "r1", "text": "a sentence"}                 text models: one string, input ``text``
    {"id": "r2", "inputs": {"x": [0.5, 1.0, 2.0, 4.0]}}  tensor models: one row per input (no batch dim)

Output, one JSON object per input row::

    {"id": "r1", "line": 1, "outputs": {"embedding": [...]}}
    {"id": "r2", "line": 2, "error": {"code": "wrong_shape", "message": "..."}}
    {"id": null, "line": 3, "error": {"code": "invalid_json", "message": "..."}}

``line`` is the 1-based input line number. Error codes are the worker's
(:class:`producer.wire.protocol.ErrorCode`) or the producer's own (:class:`RowErrorCode`).
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from producer.wire.protocol import DATATYPES, ErrorCode, InferReply

__all__ = [
    "BadRow",
    "OutputState",
    "Packer",
    "Row",
    "RowErrorCode",
    "batch_inputs",
    "count_rows",
    "error_line",
    "iter_input",
    "parse_datatypes",
    "parse_row",
    "read_output",
    "result_lines",
]


class RowErrorCode(enum.StrEnum):
    """Codes of rows the producer rejects before sending them."""

    INVALID_JSON = "invalid_json"
    """The line is not valid JSON."""
    INVALID_ROW = "invalid_row"
    """The line is JSON but not a row: no string ``id``, or neither ``text`` nor ``inputs``."""
    DUPLICATE_ID = "duplicate_id"
    """An earlier line of the input has the same ``id``; only the first is sent."""


# Rows with these codes have no trustworthy id; a resumed job recognises them by line number.
LINE_KEYED_CODES = frozenset({RowErrorCode.INVALID_JSON, RowErrorCode.INVALID_ROW, RowErrorCode.DUPLICATE_ID})

RowKey = tuple[tuple[str, str, tuple[int, ...]], ...]
"""What rows must share to travel in one request: input names, datatypes and per-row shapes."""


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One valid input row: its line, its id and one array per input (no batch dimension)."""

    line: int
    id: str
    inputs: dict[str, npt.NDArray[Any]]

    @property
    def key(self) -> RowKey:
        """Rows with equal keys can be stacked into one request."""
        return tuple((name, DATATYPES_BY_DTYPE[a.dtype.str], a.shape) for name, a in sorted(self.inputs.items()))


@dataclasses.dataclass(frozen=True, slots=True)
class BadRow:
    """An input line the producer rejects; it is reported in the output, never sent."""

    line: int
    id: str | None
    code: str
    message: str


DATATYPES_BY_DTYPE = {dt.str: name for name, dt in DATATYPES.items()}

_row_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def parse_datatypes(specs: Sequence[str]) -> tuple[str, dict[str, str]]:
    """Parse ``--datatype`` values: ``TYPE`` sets the default, ``NAME=TYPE`` one input's.

    Returns:
        (default datatype, {input name: datatype}); the default is FP32 unless given.

    Raises:
        ValueError: for a datatype that is not a numeric OIP datatype.
    """
    default, per_input = "FP32", {}
    for spec in specs:
        name, _, datatype = spec.rpartition("=")
        datatype = datatype.upper()
        if datatype not in DATATYPES or datatype == "BYTES":
            numeric = ", ".join(d for d in DATATYPES if d != "BYTES")
            raise ValueError(f"--datatype {spec!r}: {datatype!r} is not one of {numeric}")
        if name:
            per_input[name] = datatype
        else:
            default = datatype
    return default, per_input


def parse_row(
    line: int,
    text: bytes,
    *,
    text_input: str = "text",
    default_datatype: str = "FP32",
    datatypes: Mapping[str, str] | None = None,
) -> Row | BadRow:
    """Parse one input line into a :class:`Row`, or a :class:`BadRow` saying what is wrong.

    Args:
        line: 1-based line number (reported in the output).
        text: the line's bytes.
        text_input: input name a ``"text"`` field is sent as.
        default_datatype: OIP datatype of numeric ``inputs`` values.
        datatypes: per-input datatypes overriding the default.
    """
    try:
        obj = _row_decoder.decode(text)
    except msgspec.DecodeError as e:
        return BadRow(line, None, RowErrorCode.INVALID_JSON, f"line {line} is not valid JSON: {e}")
    if not isinstance(obj, dict):
        return BadRow(line, None, RowErrorCode.INVALID_ROW, f"line {line} is not a JSON object")
    row_id = obj.get("id")
    if isinstance(row_id, int) and not isinstance(row_id, bool):
        row_id = str(row_id)
    if not isinstance(row_id, str) or not row_id:
        return BadRow(line, None, RowErrorCode.INVALID_ROW, f'line {line} has no "id" (a non-empty string)')
    has_text, has_inputs = "text" in obj, "inputs" in obj
    if has_text == has_inputs:
        return BadRow(line, row_id, RowErrorCode.INVALID_ROW, 'a row needs exactly one of "text" or "inputs"')
    if has_text:
        value = obj["text"]
        if not isinstance(value, str):
            return BadRow(line, row_id, RowErrorCode.INVALID_ROW, '"text" must be a string')
        array = np.empty((), dtype=object)
        array[()] = value
        return Row(line, row_id, {text_input: array})
    raw = obj["inputs"]
    if not isinstance(raw, dict) or not raw:
        return BadRow(line, row_id, RowErrorCode.INVALID_ROW, '"inputs" must be an object of input name to values')
    inputs: dict[str, npt.NDArray[Any]] = {}
    for name, value in raw.items():
        datatype = (datatypes or {}).get(name, default_datatype)
        try:
            if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], str)):
                array = np.empty(np.shape(value), dtype=object)
                array[...] = value
            else:
                array = np.asarray(value, dtype=DATATYPES[datatype])
        except (TypeError, ValueError, OverflowError) as e:
            return BadRow(line, row_id, ErrorCode.INVALID_TENSOR, f"input {name!r} is not a {datatype} array: {e}")
        inputs[name] = array
    return Row(line, row_id, inputs)


def iter_input(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line number, line)`` for every non-blank line, reading one line at a time."""
    with path.open("rb") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                yield number, text


def count_rows(path: Path) -> int:
    """Number of non-blank lines in ``path`` (for the progress bar's total)."""
    return sum(1 for _ in iter_input(path))


class Packer:
    """Groups consecutive compatible rows into requests of at most ``rows_per_message`` rows.

    A row whose key differs from the current group's closes the group, so a malformed row
    travels alone and its error cannot fail its neighbours.
    """

    def __init__(self, rows_per_message: int) -> None:
        if rows_per_message < 1:
            raise ValueError(f"rows_per_message must be at least 1, got {rows_per_message}")
        self.rows_per_message = rows_per_message
        self._rows: list[Row] = []
        self._key: RowKey | None = None

    def add(self, row: Row) -> list[list[Row]]:
        """Add a row; returns the groups this completes (usually none, at most two)."""
        key = row.key
        finished = []
        if self._rows and key != self._key:
            finished.append(self._take())
        self._rows.append(row)
        self._key = key
        if len(self._rows) >= self.rows_per_message:
            finished.append(self._take())
        return finished

    def _take(self) -> list[Row]:
        rows, self._rows, self._key = self._rows, [], None
        return rows

    def flush(self) -> list[Row] | None:
        """The rows held so far (``None`` when empty); the packer is empty afterwards."""
        return self._take() or None


def batch_inputs(rows: Sequence[Row]) -> dict[str, npt.NDArray[Any]]:
    """Stack compatible rows into one request's inputs (rows become the first dimension)."""
    return {name: np.stack([row.inputs[name] for row in rows]) for name in rows[0].inputs}


# ---------------------------------------------------------------------------------------------
# Output lines


def _jsonable(value: npt.NDArray[Any]) -> Any:
    if value.dtype == object:
        return [x.decode(errors="replace") if isinstance(x, bytes) else x for x in value.reshape(-1).tolist()]
    return value.tolist()


def result_lines(rows: Sequence[tuple[int, str]], reply: InferReply) -> list[bytes]:
    """One output line per row from a successful reply (row ``i`` is index ``i`` of every output).

    Raises:
        ValueError: when an output's first dimension is not the number of rows.
    """
    for name, array in reply.outputs.items():
        if array.ndim == 0 or array.shape[0] != len(rows):
            raise ValueError(f"output {name!r} has shape {list(array.shape)}, expected {len(rows)} rows")
    lines = []
    for i, (line, row_id) in enumerate(rows):
        outputs = {name: _jsonable(array[i]) for name, array in reply.outputs.items()}
        lines.append(_encoder.encode({"id": row_id, "line": line, "outputs": outputs}) + b"\n")
    return lines


def error_line(line: int, row_id: str | None, code: str, message: str) -> bytes:
    """The output line reporting a failed row."""
    return _encoder.encode({"id": row_id, "line": line, "error": {"code": str(code), "message": message}}) + b"\n"


class _OutputRow(msgspec.Struct):
    id: str | None = None
    line: int = 0
    error: dict[str, Any] | None = None


_output_decoder = msgspec.json.Decoder(_OutputRow)


@dataclasses.dataclass
class OutputState:
    """What an existing output file already holds (a resumed job skips these rows)."""

    done_ids: set[str] = dataclasses.field(default_factory=set)
    done_lines: set[int] = dataclasses.field(default_factory=set)
    rows: int = 0
    failed: int = 0


def read_output(path: Path) -> OutputState:
    """Read an existing output file; a torn last line (a crash mid-write) is cut off.

    Rows answered by the worker (results and errors) are known by id; rows the producer
    rejected are known by line number, since their id may be missing or repeated.
    """
    state = OutputState()
    if not path.exists():
        return state
    with path.open("rb+") as f:
        good_end = 0
        for text in f:
            if not text.endswith(b"\n"):
                break
            try:
                row = _output_decoder.decode(text)
            except msgspec.DecodeError:
                break
            good_end += len(text)
            state.rows += 1
            code = (row.error or {}).get("code")
            if code is not None:
                state.failed += 1
            if code in LINE_KEYED_CODES or row.id is None:
                state.done_lines.add(row.line)
            else:
                state.done_ids.add(row.id)
        if good_end != f.seek(0, os.SEEK_END):
            f.truncate(good_end)
    return state
