"""Batch forming counts rows, keeps order, groups compatible requests and rows of similar length, splits
requests that do not fit; concatenation, splitting outputs and isolation."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import numpy as np
import pytest

from producer.wire.rows import concat_rows, split_rows
from worker import batching
from worker.batching import PendingRows, Split, run_isolating


def _pending(*items: tuple[str, int, str], split: Split[str] | None = None) -> PendingRows[str]:
    pending: PendingRows[str] = PendingRows(split)
    for name, rows, key in items:
        pending.add(name, rows=rows, key=key)
    return pending


def _split_name(item: str, rows: int) -> tuple[str, str]:
    """Items named ``name`` or ``name@first_row``: the head keeps the start, the tail starts ``rows`` later."""
    name, _, start = item.partition("@")
    first = int(start or 0)
    return f"{name}@{first}", f"{name}@{first + rows}"


def test_take_batch_fills_up_to_max_rows_in_arrival_order() -> None:
    pending = _pending(("a", 3, "k"), ("b", 4, "k"), ("c", 2, "k"), ("d", 1, "k"))
    assert pending.take(max_rows=8) == ["a", "b", "d"]  # c (2 rows) would exceed 8; d fits
    assert pending.clear() == ["c"]


def test_take_batch_counts_rows_not_messages() -> None:
    pending = _pending(*((str(i), 1, "k") for i in range(10)))
    assert len(pending.take(max_rows=4)) == 4
    assert pending.rows == 6
    assert len(pending) == 6


def test_take_batch_groups_by_key_and_keeps_others_in_order() -> None:
    pending = _pending(("a", 1, "short"), ("b", 1, "long"), ("c", 1, "short"), ("d", 1, "long"))
    assert pending.take(max_rows=8) == ["a", "c"]
    assert pending.take(max_rows=8) == ["b", "d"]
    assert not pending


def test_take_batch_returns_an_oversized_item_alone() -> None:
    pending = _pending(("big", 10, "k"), ("small", 1, "k"))
    assert pending.take(max_rows=4) == ["big"]
    assert pending.take(max_rows=4) == ["small"]
    assert pending.take(max_rows=4) == []


def test_with_a_splitter_a_request_lends_its_first_rows_to_a_fuller_batch() -> None:
    pending = _pending(("a", 3, "k"), ("b", 4, "k"), ("c", 5, "k"), split=_split_name)
    assert pending.take(max_rows=8) == ["a", "b", "c@0"]  # c's first row fills the batch
    assert pending.rows == 4
    assert pending.take(max_rows=8) == ["c@1"]  # the rest kept c's place


def test_with_a_splitter_an_oversized_item_is_cut_into_full_batches() -> None:
    pending = _pending(("big", 10, "k"), ("small", 1, "k"), split=_split_name)
    assert pending.take(max_rows=4) == ["big@0"]
    assert pending.take(max_rows=4) == ["big@4"]
    assert pending.take(max_rows=4) == ["big@8", "small"]
    assert not pending
    assert pending.rows == 0


def test_oldest_and_clear_follow_arrival_order_across_keys_and_lengths() -> None:
    pending: PendingRows[str] = PendingRows()
    for name, key, length in [("a", 0, 30), ("b", 1, 5), ("c", 0, 5), ("d", 0, 29)]:
        pending.add(name, rows=1, key=key, length=length)
    assert pending.oldest() == "a"
    assert pending.take(max_rows=2) == ["a", "d"]
    assert pending.oldest() == "b"
    assert pending.clear() == ["b", "c"]
    assert pending.oldest() is None
    assert pending.take(max_rows=2) == []


def test_rows_of_many_requests_group_by_length_across_requests() -> None:
    # Two requests of 4 texts each, mixed lengths: batches of 4 take the closest lengths, whatever request.
    pending: PendingRows[str] = PendingRows()
    for request, lengths in (("r1", [10, 60, 12, 58]), ("r2", [61, 11, 59, 9])):
        for row, length in enumerate(lengths):
            pending.add(f"{request}.{row}", rows=1, key=0, length=length)
    assert pending.take(max_rows=4) == ["r1.0", "r1.2", "r2.1", "r2.3"]  # 10, 12, 11, 9
    assert pending.take(max_rows=4) == ["r1.1", "r1.3", "r2.0", "r2.2"]  # 60, 58, 61, 59


def test_equally_close_lengths_are_taken_oldest_first() -> None:
    pending: PendingRows[str] = PendingRows()
    for name, length in [("anchor", 10), ("late9", 9), ("early11", 11), ("late11", 11), ("e9", 9)]:
        pending.add(name, rows=1, key=0, length=length)
    assert pending.take(max_rows=3) == ["anchor", "late9", "early11"]


def _lines_run_in_batching(run: Callable[[], object]) -> int:
    """How many lines of :mod:`worker.batching` ``run()`` executes: a cost measure that is the same on
    every run and every machine load (a clock would measure the machine)."""
    count = 0

    def local(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def calls(frame: FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code.co_filename == batching.__file__ else None

    sys.settrace(calls)
    try:
        run()
    finally:
        sys.settrace(None)
    return count


def _window(count: int) -> PendingRows[int]:
    pending: PendingRows[int] = PendingRows()
    for i in range(count):
        pending.add(i, rows=1, key=0, length=8 + (i * 7919) % 120)
    return pending


def test_forming_a_batch_costs_about_its_own_size_not_the_size_of_the_window() -> None:
    takes = 16
    seen: list[int] = []
    per_take = {}
    for count in (1024, 16384):  # 16 and 256 requests of 64 rows
        pending = _window(count)

        def take_some(p: PendingRows[int] = pending) -> None:
            for _ in range(takes):
                seen.extend(p.take(max_rows=64))

        per_take[count] = _lines_run_in_batching(take_some) / takes
        while pending:
            batch = pending.take(max_rows=64)
            assert 0 < len(batch) <= 64
            seen.extend(batch)
    # A scan of the whole window would cost 16 times as much per batch in the large one.
    assert per_take[16384] <= 1.5 * per_take[1024], per_take
    assert sorted(seen) == sorted([*range(1024), *range(16384)])


def test_concat_and_split_round_trip_mixed_request_sizes() -> None:
    requests = [{"x": np.full((n, 2), i, dtype=np.float32)} for i, n in enumerate([1, 3, 2])]
    batch = concat_rows(requests)
    assert batch["x"].shape == (6, 2)
    parts = split_rows({"y": batch["x"] * 10}, [1, 3, 2])
    for i, (part, n) in enumerate(zip(parts, [1, 3, 2], strict=True)):
        np.testing.assert_array_equal(part["y"], np.full((n, 2), i * 10, dtype=np.float32))


def test_split_rejects_outputs_without_a_batch_dimension() -> None:
    with pytest.raises(ValueError, match="first dimension 3"):
        split_rows({"y": np.zeros(2)}, [1, 2])


def test_run_isolating_gives_only_the_poison_item_its_error() -> None:
    calls: list[int] = []

    def run(items: Sequence[int]) -> list[int]:
        calls.append(len(items))
        if 13 in items:
            raise ValueError("poison")
        return [i * 2 for i in items]

    results = run_isolating(run, list(range(16)))
    assert [r for r in results if isinstance(r, Exception)] == [results[13]]
    assert isinstance(results[13], ValueError)
    assert [r for i, r in enumerate(results) if i != 13] == [i * 2 for i in range(16) if i != 13]
    assert len(calls) <= 1 + 2 * 4  # bisecting costs about 2 runs per level


def test_take_batch_with_lengths_fills_with_the_closest_lengths_to_the_oldest() -> None:
    pending: PendingRows[str] = PendingRows()
    for name, length in [("a", 12), ("b", 60), ("c", 11), ("d", 58), ("e", 14), ("f", 63), ("g", 10)]:
        pending.add(name, rows=1, key=0, length=length)
    assert pending.take(max_rows=4) == ["a", "c", "e", "g"]  # the oldest and the three shortest
    assert pending.take(max_rows=4) == ["b", "d", "f"]  # the long ones, in arrival order


def test_take_batch_with_lengths_still_starts_with_the_oldest() -> None:
    pending: PendingRows[str] = PendingRows()
    for name, length in [("old", 200), ("x", 5), ("y", 6)]:
        pending.add(name, rows=1, key=0, length=length)
    assert pending.take(max_rows=2)[0] == "old"
