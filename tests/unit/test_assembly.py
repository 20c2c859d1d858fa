"""A request's pieces come back in any order and make one result in row order; it ends once."""

from __future__ import annotations

import numpy as np
import pytest

from worker.assembly import Assembly, State


def _rows(first: int, count: int) -> dict[str, np.ndarray]:
    return {"y": np.arange(first, first + count, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)}


def test_pieces_in_any_order_complete_in_row_order() -> None:
    assembly = Assembly(6)
    assert not assembly.add(4, 2, _rows(4, 2))
    assert not assembly.add(0, 1, _rows(0, 1))
    assert assembly.open
    assert assembly.add(1, 3, _rows(1, 3))
    assert assembly.state is State.COMPLETE
    np.testing.assert_array_equal(assembly.outputs()["y"][:, 0], np.arange(6, dtype=np.float32))


def test_a_single_piece_is_passed_through_without_a_copy() -> None:
    outputs = _rows(0, 4)
    assembly = Assembly(4)
    assert assembly.add(0, 4, outputs)
    assert assembly.outputs() is outputs


def test_a_failed_piece_fails_the_request_once_and_later_pieces_are_ignored() -> None:
    assembly = Assembly(3)
    assert not assembly.add(0, 1, _rows(0, 1))
    assert assembly.fail()
    assert not assembly.fail()  # a second failing piece: no second error reply
    assert not assembly.add(1, 2, _rows(1, 2))
    assert assembly.state is State.FAILED
    with pytest.raises(ValueError, match="failed"):
        assembly.outputs()


def test_a_closed_request_ignores_late_pieces_and_cannot_be_closed_twice() -> None:
    assembly = Assembly(2)
    assert assembly.close()
    assert not assembly.close()
    assert not assembly.add(0, 2, _rows(0, 2))
    assert not assembly.fail()
    assert assembly.state is State.CLOSED


def test_runs_and_times_span_every_run_the_request_rode_in() -> None:
    assembly = Assembly(4)
    assert not assembly.started
    assembly.begin_run(7)
    assembly.begin_run(7)  # two pieces in the same run count once
    assembly.begin_run(8)
    assert assembly.started
    assert assembly.runs == 2
    assembly.ran(10.0, 10.5)
    assembly.ran(10.4, 11.0)
    assert (assembly.started_s, assembly.finished_s) == (10.0, 11.0)


@pytest.mark.parametrize(("first", "rows"), [(-1, 1), (0, 0), (3, 2)])
def test_a_piece_outside_the_request_is_a_bug(first: int, rows: int) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        Assembly(4).add(first, rows, _rows(0, 1))


def test_more_rows_than_the_request_has_is_a_bug() -> None:
    assembly = Assembly(2)
    assembly.add(0, 2 - 1, _rows(0, 1))
    with pytest.raises(ValueError, match="does not fit"):
        assembly.add(0, 2, _rows(0, 2))


def test_a_request_has_at_least_one_row() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        Assembly(0)
