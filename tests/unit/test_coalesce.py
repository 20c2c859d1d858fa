"""Client-side coalescing without a broker: lane keys, packing and splitting rows, the Nagle rule."""

from __future__ import annotations

import asyncio
from collections import deque

import numpy as np
import pytest

from producer.client.coalesce import Coalescer, lane_key, split_rows, take_rows
from producer.wire.errors import ProtocolError
from producer.wire.rows import concat_rows


def test_calls_share_a_lane_only_with_the_same_names_dtypes_and_row_shape() -> None:
    a = lane_key({"x": np.zeros((1, 4), np.float32)})
    assert a == lane_key({"x": np.ones((3, 4), np.float32)})  # rows may differ
    assert a != lane_key({"x": np.zeros((1, 5), np.float32)})
    assert a != lane_key({"x": np.zeros((1, 4), np.float64)})
    assert a != lane_key({"y": np.zeros((1, 4), np.float32)})


@pytest.mark.parametrize(
    "inputs",
    [
        {},
        {"x": np.float32(1.0)},  # a scalar has no rows
        {"x": np.zeros((0, 4), np.float32)},  # no rows
        {"x": np.zeros((2, 4), np.float32), "m": np.zeros((3, 4), np.float32)},  # rows disagree
    ],
)
def test_inputs_that_cannot_be_packed_have_no_lane(inputs: dict[str, np.ndarray]) -> None:
    assert lane_key(inputs) is None


def test_packed_rows_split_back_to_each_call_in_order() -> None:
    parts = [{"x": np.full((n, 2), i, np.float32)} for i, n in enumerate([1, 3, 2])]
    packed = concat_rows(parts)
    assert packed["x"].shape == (6, 2)
    back = split_rows({"y": packed["x"] * 10}, [1, 3, 2])
    for i, (part, out) in enumerate(zip(parts, back, strict=True)):
        np.testing.assert_array_equal(out["y"], part["x"] * 10)
        assert out["y"].shape[0] == part["x"].shape[0], i


def test_a_reply_with_the_wrong_row_count_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="packed request of 3 rows"):
        split_rows({"y": np.zeros((2, 1))}, [1, 2])


def test_take_rows_fills_a_message_from_the_front_and_drops_abandoned_calls() -> None:
    waiting = deque([("a", 2, True), ("gone", 5, False), ("b", 3, True), ("c", 2, True)])
    taken = take_rows(waiting, 5, rows_of=lambda c: c[1], wanted=lambda c: c[2])
    assert [c[0] for c in taken] == ["a", "b"]
    assert [c[0] for c in waiting] == ["c"]


def test_a_call_larger_than_a_message_still_goes_alone() -> None:
    waiting = deque([("big", 9), ("small", 1)])
    assert take_rows(waiting, 4, rows_of=lambda c: c[1], wanted=lambda c: True) == [("big", 9)]


async def test_a_lone_call_goes_at_once_and_calls_behind_an_unconfirmed_publish_leave_together() -> None:
    sent: list[list[str]] = []
    confirm = asyncio.Event()
    all_sent = asyncio.Event()

    async def send(calls: list[str]) -> None:
        sent.append(calls)
        if "e" in calls:
            all_sent.set()
        await confirm.wait()  # the broker's confirm

    coalescer: Coalescer[str] = Coalescer(3, send, rows_of=lambda c: 1, wanted=lambda c: True)
    coalescer.submit("lane", "first")
    await asyncio.sleep(0)  # one loop turn: the lane's task starts and publishes at once
    assert sent == [["first"]]
    for name in ("b", "c", "d", "e"):
        coalescer.submit("lane", name)
    coalescer.submit("other", "z")  # another lane is not held back by this one
    await asyncio.sleep(0)
    assert sent == [["first"], ["z"]]
    confirm.set()
    await asyncio.wait_for(all_sent.wait(), 5)
    assert sent == [["first"], ["z"], ["b", "c", "d"], ["e"]]
    assert await coalescer.close() == []


async def test_waiting_calls_are_returned_on_close() -> None:
    never = asyncio.Event()

    async def send(calls: list[int]) -> None:
        await never.wait()

    coalescer: Coalescer[int] = Coalescer(8, send, rows_of=lambda c: 1, wanted=lambda c: True)
    coalescer.submit("lane", 0)
    await asyncio.sleep(0)  # 0 is published and never confirmed
    coalescer.submit("lane", 1)
    coalescer.submit("lane", 2)
    assert await coalescer.close() == [1, 2]
