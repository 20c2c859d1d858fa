"""Batch forming counts rows, keeps order, groups compatible requests; splitting and isolation."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import pytest

from worker.batching import Batchable, concat_inputs, pending_rows, run_isolating, split_outputs, take_batch


def _pending(*items: tuple[str, int, str]) -> deque[Batchable[str]]:
    return deque(Batchable(name, rows=rows, key=key) for name, rows, key in items)


def test_take_batch_fills_up_to_max_rows_in_arrival_order() -> None:
    pending = _pending(("a", 3, "k"), ("b", 4, "k"), ("c", 2, "k"), ("d", 1, "k"))
    assert take_batch(pending, max_rows=8) == ["a", "b", "d"]  # c (2 rows) would exceed 8; d fits
    assert [b.item for b in pending] == ["c"]


def test_take_batch_counts_rows_not_messages() -> None:
    pending = _pending(*((str(i), 1, "k") for i in range(10)))
    assert len(take_batch(pending, max_rows=4)) == 4
    assert pending_rows(pending) == 6


def test_take_batch_groups_by_key_and_keeps_others_in_order() -> None:
    pending = _pending(("a", 1, "short"), ("b", 1, "long"), ("c", 1, "short"), ("d", 1, "long"))
    assert take_batch(pending, max_rows=8) == ["a", "c"]
    assert take_batch(pending, max_rows=8) == ["b", "d"]
    assert not pending


def test_take_batch_returns_an_oversized_item_alone() -> None:
    pending = _pending(("big", 10, "k"), ("small", 1, "k"))
    assert take_batch(pending, max_rows=4) == ["big"]
    assert take_batch(pending, max_rows=4) == ["small"]
    assert take_batch(pending, max_rows=4) == []


def test_concat_and_split_round_trip_mixed_request_sizes() -> None:
    requests = [{"x": np.full((n, 2), i, dtype=np.float32)} for i, n in enumerate([1, 3, 2])]
    batch = concat_inputs(requests)
    assert batch["x"].shape == (6, 2)
    parts = split_outputs({"y": batch["x"] * 10}, [1, 3, 2])
    for i, (part, n) in enumerate(zip(parts, [1, 3, 2], strict=True)):
        np.testing.assert_array_equal(part["y"], np.full((n, 2), i * 10, dtype=np.float32))


def test_split_rejects_outputs_without_a_batch_dimension() -> None:
    with pytest.raises(ValueError, match="first dimension 3"):
        split_outputs({"y": np.zeros(2)}, [1, 2])


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
    pending: deque[Batchable[str]] = deque(
        Batchable(name, rows=1, key=0, length=length)
        for name, length in [("a", 12), ("b", 60), ("c", 11), ("d", 58), ("e", 14), ("f", 63), ("g", 10)]
    )
    assert take_batch(pending, max_rows=4) == ["a", "c", "e", "g"]  # the oldest and the three shortest
    assert take_batch(pending, max_rows=4) == ["b", "d", "f"]  # the long ones, in arrival order


def test_take_batch_with_lengths_still_starts_with_the_oldest() -> None:
    pending: deque[Batchable[str]] = deque(
        Batchable(name, rows=1, key=0, length=length) for name, length in [("old", 200), ("x", 5), ("y", 6)]
    )
    assert take_batch(pending, max_rows=2)[0] == "old"
