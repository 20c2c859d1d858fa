"""Putting a request back together from its pieces. Pure: no I/O, no clocks of its own.

With row-level scheduling a request's rows may ride in several model runs, side by side with other
requests' rows. One :class:`Assembly` per request collects the outputs of its pieces (each piece: a
run of consecutive rows, known by its first row) and yields the request's outputs in row order once
its last row is done. It also records what the reply's timing reports: when the first of its runs
started, how many runs it rode in, and when the last one ended.

An assembly ends once: complete, failed (one piece failed: the whole request is answered with the
error), or closed by its owner (answered ``deadline_exceeded`` before any piece started, or handed
back by a drain); pieces that come back after that are ignored.

Called by the scheduler; calls numpy only.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

from worker.batching import Arrays


class State(enum.Enum):
    """Where an assembly stands."""

    OPEN = "open"
    """Rows are still to come."""
    COMPLETE = "complete"
    """Every row is done: the request can be answered with :meth:`Assembly.outputs`."""
    FAILED = "failed"
    """A piece failed: the request is answered with that error, once."""
    CLOSED = "closed"
    """Its owner ended it (answered without computing, or handed back)."""


class Assembly:
    """The outputs of one request's pieces, collected until its last row is done.

    Args:
        rows: the request's rows (first dimension).
    """

    __slots__ = ("_last_run", "_parts", "done_rows", "finished_s", "rows", "runs", "started", "started_s", "state")

    def __init__(self, rows: int) -> None:
        if rows < 1:
            raise ValueError(f"a request has at least one row, got {rows}")
        self.rows = rows
        self.done_rows = 0
        self.state = State.OPEN
        self.started = False
        """True once any of its pieces was handed to a model run."""
        self.started_s: float | None = None
        """When the first model run that held one of its rows started (monotonic s)."""
        self.finished_s: float | None = None
        """When the last model run that held one of its rows ended (monotonic s)."""
        self.runs = 0
        """Model runs its rows rode in."""
        self._last_run = -1
        self._parts: list[tuple[int, Arrays]] = []

    @property
    def open(self) -> bool:
        """True while the request waits for rows (not complete, failed or closed)."""
        return self.state is State.OPEN

    def begin_run(self, run_id: int) -> None:
        """Record that a piece of this request was handed to model run ``run_id`` (it has started)."""
        self.started = True
        if run_id != self._last_run:
            self._last_run = run_id
            self.runs += 1

    def ran(self, started_s: float, finished_s: float) -> None:
        """Record the start and end (monotonic s) of a model run that held one of its pieces."""
        if self.started_s is None or started_s < self.started_s:
            self.started_s = started_s
        if self.finished_s is None or finished_s > self.finished_s:
            self.finished_s = finished_s

    def add(self, first_row: int, rows: int, outputs: Arrays) -> bool:
        """Record a finished piece: ``rows`` rows from ``first_row``, with its outputs.

        Returns:
            True when this piece completed the request (its state is then ``COMPLETE``); False while
            rows are missing, and for a piece that comes back after the assembly ended (ignored).

        Raises:
            ValueError: when the piece does not fit the request's rows (a bug in whoever split it).
        """
        if self.state is not State.OPEN:
            return False
        if first_row < 0 or rows < 1 or first_row + rows > self.rows or self.done_rows + rows > self.rows:
            raise ValueError(f"piece of rows {first_row}..{first_row + rows} does not fit a request of {self.rows}")
        self._parts.append((first_row, outputs))
        self.done_rows += rows
        if self.done_rows == self.rows:
            self.state = State.COMPLETE
            return True
        return False

    def fail(self) -> bool:
        """Record that a piece failed. Returns True the first time (answer the error), else False."""
        if self.state is not State.OPEN:
            return False
        self.state = State.FAILED
        self._parts.clear()
        return True

    def close(self) -> bool:
        """End the assembly without a result. Returns True if it was open (its owner answers or hands back)."""
        if self.state is not State.OPEN:
            return False
        self.state = State.CLOSED
        self._parts.clear()
        return True

    def outputs(self) -> Arrays:
        """The request's outputs in row order (each output concatenated over its pieces).

        Raises:
            ValueError: when the assembly is not complete.
        """
        if self.state is not State.COMPLETE:
            raise ValueError(f"assembly is {self.state.value}, not complete")
        if len(self._parts) == 1:
            return self._parts[0][1]
        self._parts.sort(key=lambda part: part[0])
        names = self._parts[0][1].keys()
        joined: dict[str, Any] = {name: np.concatenate([p[name] for _, p in self._parts], axis=0) for name in names}
        return joined
