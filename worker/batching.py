"""Batch forming, concatenation, splitting and failure isolation. Pure: no I/O, no clocks.

Batches count rows, not messages: a request may carry several rows (its first dimension), and with
row-level scheduling the items waiting for a batch are pieces of requests (see ``worker.assembly``
for putting a request's pieces back together). Called by the scheduler, the runner and the pipelines.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy.typing as npt

T = TypeVar("T")
R = TypeVar("R")
Arrays = dict[str, npt.NDArray[Any]]


class _Entry(Generic[T]):
    """One item in :class:`PendingRows`: what it is, where it arrived, how it may be batched."""

    __slots__ = ("item", "key", "length", "rows", "seq", "taken")

    def __init__(self, seq: int, item: T, rows: int, key: Hashable, length: int | None) -> None:
        self.seq = seq
        self.item = item
        self.rows = rows
        self.key = key
        self.length = length
        self.taken = False


Split = Callable[[T, int], tuple[T, T]]
"""Splits an item into its first ``n`` rows and the rest: ``split(item, n) -> (head, tail)``."""


class PendingRows(Generic[T]):
    """Items waiting for a batch, in arrival order, indexed by compatibility key and length.

    An item is a request or a piece of one (some of its rows). Every batch starts with the oldest
    item, so nothing starves, and adds items with the same key until ``max_rows``: in arrival order,
    or, when the oldest item has a ``length`` (tokens its rows are padded to), those whose lengths are
    closest to it (ties in arrival order), so the batch pads as little as the window allows. Items
    are kept in one bucket per (key, length), so forming a batch costs about its own size, not the
    size of the window.

    Args:
        split: with a splitter, an item with more rows than the batch has room for is split: its
            first rows fill the batch and the rest keep its place. Without one, such an item is
            skipped and keeps its place (an item larger than ``max_rows`` on its own still forms a
            batch alone).
    """

    def __init__(self, split: Split[T] | None = None) -> None:
        self._split = split
        self._order: deque[_Entry[T]] = deque()
        self._buckets: dict[Hashable, dict[int | None, deque[_Entry[T]]]] = {}
        self._seq = 0
        self._items = 0
        self.rows = 0
        """Rows waiting, over every item."""

    def __len__(self) -> int:
        return self._items

    def add(self, item: T, *, rows: int, key: Hashable, length: int | None = None) -> None:
        """Queue ``item`` (``rows`` rows; only items of equal ``key`` share a batch)."""
        entry = _Entry(self._seq, item, rows, key, length)
        self._seq += 1
        self._order.append(entry)
        self._buckets.setdefault(key, {}).setdefault(length, deque()).append(entry)
        self._items += 1
        self.rows += rows

    def oldest(self) -> T | None:
        """The item waiting longest, or None when nothing waits."""
        entry = self._head()
        return None if entry is None else entry.item

    def take(self, max_rows: int) -> list[T]:
        """Remove and return the next batch (in arrival order), or ``[]`` when nothing waits."""
        first = self._head()
        if first is None:
            return []
        taken: list[tuple[int, T]] = []
        free = max_rows
        touched: list[deque[_Entry[T]]] = []
        group = self._buckets[first.key]
        if first.rows > max_rows and self._split is not None:
            candidates: Iterator[_Entry[T]] = iter((first,))
        elif first.rows >= max_rows:
            self._take(first, taken)
            touched.append(group[first.length])
            candidates = iter(())
            free = 0
        else:
            candidates = self._candidates(group, first.length)
        skipped = False
        for entry in candidates:
            if free == 0:
                break
            if entry.taken:
                continue
            if entry.rows <= free:
                free -= entry.rows
                self._take(entry, taken)
            elif self._split is not None:
                head, entry.item = self._split(entry.item, free)
                entry.rows -= free
                self.rows -= free
                taken.append((entry.seq, head))
                free = 0
                continue
            else:
                skipped = True
                continue
            bucket = group[entry.length]
            if not touched or touched[-1] is not bucket:
                touched.append(bucket)
        for bucket in touched:
            self._tidy(bucket, skipped)
        for length in [n for n, bucket in group.items() if not bucket]:
            del group[length]
        if not group:
            del self._buckets[first.key]
        taken.sort(key=lambda pair: pair[0])
        return [item for _, item in taken]

    def clear(self) -> list[T]:
        """Remove and return every item, in arrival order."""
        items = [e.item for e in self._order if not e.taken]
        self._order.clear()
        self._buckets.clear()
        self._items = 0
        self.rows = 0
        return items

    def _head(self) -> _Entry[T] | None:
        order = self._order
        while order and order[0].taken:
            order.popleft()
        return order[0] if order else None

    def _take(self, entry: _Entry[T], taken: list[tuple[int, T]]) -> None:
        entry.taken = True
        self._items -= 1
        self.rows -= entry.rows
        taken.append((entry.seq, entry.item))

    @staticmethod
    def _tidy(bucket: deque[_Entry[T]], skipped: bool) -> None:
        """Drop taken entries from a bucket: from its front, or everywhere after items were skipped."""
        while bucket and bucket[0].taken:
            bucket.popleft()
        if skipped and any(e.taken for e in bucket):
            kept = [e for e in bucket if not e.taken]
            bucket.clear()
            bucket.extend(kept)

    @staticmethod
    def _candidates(group: dict[int | None, deque[_Entry[T]]], anchor: int | None) -> Iterator[_Entry[T]]:
        """Entries of one key: in arrival order, or by distance of their length to ``anchor`` (ties by age)."""
        if anchor is None:
            yield from group.get(None, ())
            return
        lengths = sorted((n for n in group if n is not None), key=lambda n: (abs(n - anchor), n))
        i = 0
        while i < len(lengths):
            if i + 1 < len(lengths) and abs(lengths[i + 1] - anchor) == abs(lengths[i] - anchor):
                yield from heapq.merge(group[lengths[i]], group[lengths[i + 1]], key=lambda e: e.seq)
                i += 2
            else:
                yield from group[lengths[i]]
                i += 1


def run_isolating(run: Callable[[Sequence[T]], list[R]], items: Sequence[T]) -> list[R | Exception]:
    """Run ``items`` as one batch; if it fails, bisect so only the failing items get the exception.

    A batch of ``n`` items with one poison item costs about ``2 * log2(n)`` extra runs.
    """
    try:
        return list(run(items))
    except Exception as error:
        if len(items) == 1:
            return [error]
    middle = len(items) // 2
    return run_isolating(run, items[:middle]) + run_isolating(run, items[middle:])
