"""Injecting a fault at a state the test has observed: a worker process that holds unacked deliveries.

A test that kills (or signals, or disconnects) a worker "mid-load" and then asserts that the
worker's unacked requests were redelivered is only deterministic when the worker held some at the
moment of the fault. Waiting for a number of replies first guesses that moment: on a busy machine
the worker may just have acked everything. :func:`freeze_holding` observes it instead:

1. It stops the processes (SIGSTOP: nothing they hold can be acked while they are stopped).
2. It reads each process's in-flight gauge (``qinfer_inflight_requests``, deliveries received and
   not yet settled) from the metric file prometheus-client keeps for that process in its
   ``PROMETHEUS_MULTIPROC_DIR``: a stopped process cannot answer ``/metrics``, its file can be read.
3. When every process holds enough (``at_least``, one by default), they stay stopped: the caller
   injects its fault, then resumes them (:func:`resume`). Otherwise they run a moment longer and it
   looks again, until a bound.

The gauge counts a delivery from its arrival until just before the worker writes its ack, so while
the process is stopped the broker holds at least that many of its deliveries unacked: a SIGKILL (or a
closed connection) then requeues them, with certainty.

A supervisor's consumer processes keep metric files already (:mod:`worker.supervisor`); a lone worker
keeps them when started with ``PROMETHEUS_MULTIPROC_DIR`` set (:func:`metrics_env`). Linux only (it
reads ``/proc``), as the fault-injection tests are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aio_pika
from prometheus_client.mmap_dict import MmapedDict

from worker.metrics import MULTIPROC_DIR_ENV

INFLIGHT = "qinfer_inflight_requests"
HOLD_TIMEOUT_S = 60.0
"""How long :func:`freeze_holding` looks for a moment when every process holds a delivery."""
RUN_BETWEEN_LOOKS_S = 0.002
"""How long the processes run between two looks: short, so a moment of holding is not missed."""
STOP_TIMEOUT_S = 10.0


class NotHolding(AssertionError):
    """No moment came, within the bound, when every process held an unsettled delivery."""


def metrics_env(workdir: Path) -> dict[str, str]:
    """The environment variable that makes a lone worker keep its metrics in a fresh folder under ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    return {MULTIPROC_DIR_ENV: tempfile.mkdtemp(prefix="metrics-", dir=workdir)}


def metrics_dir_of(pid: int) -> Path:
    """The folder where process ``pid`` keeps its metric files (its ``PROMETHEUS_MULTIPROC_DIR``)."""
    for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        name, _, value = entry.partition(b"=")
        if name.decode(errors="replace") == MULTIPROC_DIR_ENV:
            return Path(value.decode())
    raise RuntimeError(
        f"process {pid} keeps no metric files: start it with {MULTIPROC_DIR_ENV} set (tests.support.faults.metrics_env)"
    )


def inflight_of(pid: int, metrics_dir: Path) -> int:
    """Process ``pid``'s in-flight gauge as its metric file holds it (0 before it has one)."""
    path = metrics_dir / f"gauge_livesum_{pid}.db"
    if not path.exists():
        return 0
    for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):  # type: ignore[no-untyped-call]
        if json.loads(key)[1] == INFLIGHT:
            return int(value)
    return 0


def _is_stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (state T), so none can change what it holds."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # that thread has exited
            continue
        if stat.rpartition(")")[2].split()[0] not in ("T", "t"):
            return False
    return True


async def stop(pids: Sequence[int]) -> None:
    """SIGSTOP every process and wait until each is stopped."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while not all(_is_stopped(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {list(pids)} did not stop within {STOP_TIMEOUT_S:g} s of SIGSTOP")
        await asyncio.sleep(0.0005)


@contextlib.asynccontextmanager
async def paused(pids: Sequence[int]) -> AsyncIterator[None]:
    """Every consumer of a queue stopped for the body, resumed after it whatever happens.

    Published meanwhile, the load waits in the queue (each stopped consumer takes one delivery: a
    worker's window starts at one), so a worker that :func:`freeze_holding` then lets run has the
    backlog to itself and takes a full window, however fast the others would have been.
    """
    await stop(pids)
    try:
        yield
    finally:
        resume(pids)


async def wait_for_ready(amqp_url: str, queue: str, *, at_least: int, timeout_s: float = HOLD_TIMEOUT_S) -> int:
    """Wait until ``queue`` holds ``at_least`` ready messages (as the queue itself counts them); return the count.

    With every consumer stopped (:func:`paused`), ready messages mean each consumer with room in its
    prefetch window has been handed its share already: the broker leaves nothing ready while a consumer
    has room. A worker's window starts at one, so a fresh worker stopped before the load holds exactly one.

    Raises:
        NotHolding: fewer within ``timeout_s``.
    """
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        deadline = time.monotonic() + timeout_s
        while True:
            ready = (await channel.declare_queue(queue, passive=True)).declaration_result.message_count or 0
            if ready >= at_least:
                return ready
            if time.monotonic() > deadline:
                raise NotHolding(f"queue {queue!r} never held {at_least} ready messages within {timeout_s:g} s")
            await asyncio.sleep(0.005)


def resume(pids: Sequence[int]) -> None:
    """SIGCONT every process still there (one killed meanwhile is skipped)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def freeze_holding(
    pids: Sequence[int], *, what: str, at_least: int = 1, timeout_s: float = HOLD_TIMEOUT_S
) -> list[int]:
    """Stop ``pids`` at a moment when each holds ``at_least`` unsettled deliveries; their counts, in order.

    The processes are left stopped (whether they were running or stopped on entry): inject the fault,
    then :func:`resume` them. ``what`` names them in the failure message.

    Raises:
        NotHolding: no such moment within ``timeout_s`` (the processes are resumed).
    """
    dirs = [metrics_dir_of(pid) for pid in pids]
    deadline = time.monotonic() + timeout_s
    looks = 0
    while True:
        await stop(pids)
        held = [inflight_of(pid, d) for pid, d in zip(pids, dirs, strict=True)]
        looks += 1
        if all(n >= at_least for n in held):
            return held
        resume(pids)
        if time.monotonic() > deadline:
            raise NotHolding(
                f"{what} never held {at_least} unsettled deliveries each, all at once, within {timeout_s:g} s "
                f"({looks} looks, last in-flight counts {held}): the fault would test nothing"
            )
        await asyncio.sleep(RUN_BETWEEN_LOOKS_S)
