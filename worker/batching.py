"""Batch forming, concatenation, splitting and failure isolation. Pure: no I/O, no clocks.

Batches count rows, not messages: a request may carry several rows (its first dimension).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

T = TypeVar("T")
R = TypeVar("R")
Arrays = dict[str, npt.NDArray[Any]]


class Batchable(Generic[T]):
    """An item waiting for a batch.

    Attributes:
        item: the payload.
        rows: its row count (first dimension).
        key: compatibility key; only items with equal keys share a batch.
        length: the length its rows are padded to (tokens for text), or None when nothing is padded.
    """

    __slots__ = ("item", "key", "length", "rows")

    def __init__(self, item: T, *, rows: int, key: Hashable, length: int | None = None) -> None:
        self.item = item
        self.rows = rows
        self.key = key
        self.length = length


def take_batch(pending: deque[Batchable[T]], max_rows: int) -> list[T]:
    """Remove and return the next batch from ``pending``.

    The batch always contains the oldest item, so nothing starves. It adds items with the same
    key while the row count stays within ``max_rows``: in arrival order, or, when the oldest item
    has a ``length``, those whose lengths are closest to it (ties in arrival order), so the batch
    pads as little as the window allows. Items left out keep their place for the next batch. An
    item larger than ``max_rows`` on its own is still returned alone (the caller rejects such
    requests before they get here).
    """
    if not pending:
        return []
    first = pending.popleft()
    rows = first.rows
    if rows >= max_rows or not pending:
        return [first.item]
    if first.length is None:  # arrival order: scan from the front, keep what does not fit in place
        batch = [first.item]
        skipped: list[Batchable[T]] = []
        while pending and rows < max_rows:
            candidate = pending.popleft()
            if candidate.key == first.key and rows + candidate.rows <= max_rows:
                batch.append(candidate.item)
                rows += candidate.rows
            else:
                skipped.append(candidate)
        pending.extendleft(reversed(skipped))
        return batch
    items = list(pending)
    candidates = [i for i, b in enumerate(items) if b.key == first.key]
    anchor = first.length
    candidates.sort(key=lambda i: abs((items[i].length or 0) - anchor))
    chosen: list[int] = []
    for i in candidates:
        if rows + items[i].rows <= max_rows:
            chosen.append(i)
            rows += items[i].rows
            if rows == max_rows:
                break
    if not chosen:
        return [first.item]
    taken = set(chosen)
    batch = [first.item] + [items[i].item for i in sorted(chosen)]
    kept = [b for i, b in enumerate(items) if i not in taken]
    pending.clear()
    pending.extend(kept)
    return batch


def pending_rows(pending: deque[Batchable[T]]) -> int:
    """Rows waiting in ``pending``."""
    return sum(b.rows for b in pending)


def concat_inputs(inputs: Sequence[Mapping[str, npt.NDArray[Any]]]) -> Arrays:
    """Concatenate per-request inputs along the first dimension (no copy for a single request)."""
    if len(inputs) == 1:
        return dict(inputs[0])
    return {name: np.concatenate([x[name] for x in inputs], axis=0) for name in inputs[0]}


def split_outputs(outputs: Mapping[str, npt.NDArray[Any]], rows: Sequence[int]) -> list[Arrays]:
    """Split batch outputs back into one dict per request, by each request's row count.

    Raises:
        ValueError: when an output's first dimension is not the batch's total rows.
    """
    total = sum(rows)
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != total:
            raise ValueError(f"output {name!r} has shape {list(value.shape)}, expected first dimension {total}")
    if len(rows) == 1:
        return [dict(outputs)]
    bounds = np.cumsum(rows)[:-1]
    pieces = {name: np.split(value, bounds) for name, value in outputs.items()}
    return [{name: pieces[name][i] for name in outputs} for i in range(len(rows))]


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
