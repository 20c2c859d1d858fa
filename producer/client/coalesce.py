"""Client-side coalescing: concurrent calls packed into multi-row requests, Nagle-style.

A worker's host path costs about the same per message whether it carries one row or sixty-four, so
single-row calls from many concurrent callers are cheaper to serve packed. The rule never makes a
call wait for company: calls go into a *lane* (one per queue and request shape), and a lane with no
publish in flight sends what it holds at once. Calls that arrive while a lane's publish awaits the
broker's confirm wait in the lane and leave together, as one request of up to ``max_rows`` rows,
when the confirm comes. Under light load every call goes alone; under heavy load messages fill up.

Pure helpers (:func:`lane_key`, :func:`split_rows`; packing is :func:`producer.wire.rows.concat_rows`) and the
:class:`Coalescer` that runs the lanes; the client (``producer.client.rpc``) and the load generator supply the
publish and the replies. A call that must not be packed takes a lane of its own (a key no other call shares).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy.typing as npt

from producer.amqp.logs import get_logger
from producer.amqp.tasks import TaskSet
from producer.wire.errors import ProtocolError
from producer.wire.protocol import ErrorCode
from producer.wire.rows import Arrays
from producer.wire.rows import split_rows as rows_split

log = get_logger("coalesce")

C = TypeVar("C")


def lane_key(inputs: Mapping[str, npt.NDArray[Any]]) -> Hashable | None:
    """What calls must share to be packed: input names, dtypes and non-batch dimensions.

    None when the inputs cannot be packed (a scalar, no rows, or inputs that disagree on rows).
    """
    if not inputs:
        return None
    rows = {a.shape[0] if a.ndim else None for a in inputs.values()}
    if len(rows) != 1 or None in rows or 0 in rows:
        return None
    return tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in inputs.items()))


def split_rows(outputs: Mapping[str, npt.NDArray[Any]], rows: Sequence[int]) -> list[Arrays]:
    """Split a packed reply's outputs back into one dict per call, by each call's row count.

    Raises:
        ProtocolError: when an output's first dimension is not the packed request's row count.
    """
    try:
        return rows_split(outputs, rows)
    except ValueError as e:
        raise ProtocolError(
            ErrorCode.BAD_ENCODING, f"a reply to a packed request of {sum(rows)} rows does not split: {e}"
        ) from e


def take_rows(waiting: deque[C], max_rows: int, rows_of: Callable[[C], int], wanted: Callable[[C], bool]) -> list[C]:
    """Remove and return the calls for one message: from the front, up to ``max_rows`` rows.

    Calls no longer ``wanted`` (their caller gave up) are dropped on the way. The first call is
    always taken, so a call of more than ``max_rows`` rows still goes (alone).
    """
    taken: list[C] = []
    rows = 0
    while waiting:
        call = waiting[0]
        if not wanted(call):
            waiting.popleft()
            continue
        if taken and rows + rows_of(call) > max_rows:
            break
        taken.append(waiting.popleft())
        rows += rows_of(call)
    return taken


class Coalescer(Generic[C]):
    """Runs the lanes: at most one publish in flight per lane, the rest packed behind it.

    Args:
        max_rows: most rows in one packed message.
        send: publishes one message for the given calls and returns once the broker confirmed it
            (or raised: ``send`` reports failures to its calls itself).
        rows_of: a call's row count.
        wanted: False once a call's caller gave up (timed out or was cancelled).
    """

    def __init__(
        self,
        max_rows: int,
        send: Callable[[list[C]], Awaitable[None]],
        *,
        rows_of: Callable[[C], int],
        wanted: Callable[[C], bool],
    ) -> None:
        self.max_rows = max_rows
        self._send = send
        self._rows_of = rows_of
        self._wanted = wanted
        self._lanes: dict[Hashable, deque[C]] = {}
        self._tasks = TaskSet(on_error=lambda e: log.error("coalescer_lane_failed", error=repr(e)))

    def submit(self, key: Hashable, call: C) -> None:
        """Queue ``call`` in lane ``key``; a lane with no publish in flight sends it at once."""
        lane = self._lanes.get(key)
        if lane is not None:
            lane.append(call)  # a publish is in flight: leave with the next message
            return
        lane = self._lanes[key] = deque([call])
        self._tasks.spawn(self._run(key, lane))

    async def _run(self, key: Hashable, lane: deque[C]) -> None:
        try:
            while calls := take_rows(lane, self.max_rows, self._rows_of, self._wanted):
                await self._send(calls)
        finally:
            del self._lanes[key]

    async def close(self) -> list[C]:
        """Stop every lane and return the calls still waiting in them (the caller fails them)."""
        left = [call for lane in self._lanes.values() for call in lane]
        for lane in self._lanes.values():
            lane.clear()
        await self._tasks.cancel_all()
        return left
