"""Owned background tasks: each one kept until it ends, and its failure handed on or logged, never lost.

Owns :class:`TaskSet`. Used by every program that spawns tasks beside its callers: the worker (replies, retries,
off-loop intake, window changes), the RPC client and its coalescer (resends, lanes), bulk jobs (publishes, the
reply loop) and the load generator (publishes). Calls nothing of the project.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from producer.amqp.logs import get_logger

__all__ = ["TaskSet"]

log = get_logger("tasks")


class TaskSet:
    """Owns the tasks a program spawns; a task's failure goes to ``on_error`` (default: logged as ``task_failed``).

    Args:
        on_error: called with the exception of a task that failed (not one that was cancelled).
        on_done: called after any task ends (the worker's scheduler uses it to notice that the worker went idle).
    """

    def __init__(
        self,
        on_error: Callable[[BaseException], None] | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_error = on_error
        self.on_done = on_done

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[None]]:
        return iter(list(self._tasks))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in a task of its own, kept until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def cancel_all(self) -> None:
        """Cancel every task and wait until each has ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            if self.on_error is not None:
                self.on_error(error)
            else:
                log.error("task_failed", error=repr(error), exc_info=error)
        if self.on_done is not None:
            self.on_done()
