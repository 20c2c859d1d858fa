"""The worker's background tasks: each one owned until it ends, and its failure logged, never lost."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import structlog

log = structlog.get_logger("worker")


class TaskSet:
    """Owns the tasks the worker spawns (replies, retries, off-loop intake, window changes).

    Args:
        on_done: called after any task ends (the scheduler uses it to notice that the worker went idle).
    """

    def __init__(self, on_done: Callable[[], None] | None = None) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_done = on_done

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[None]]:
        return iter(list(self._tasks))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in a task of its own, kept until it ends."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task_failed", error=repr(task.exception()), exc_info=task.exception())
        if self.on_done is not None:
            self.on_done()
