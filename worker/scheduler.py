"""Forming batches and keeping the model busy: the worker's batch loop.

Owns the requests waiting for a batch (``pending``) and the loop that takes batches of compatible
rows from them (:func:`worker.batching.take_batch`), skips requests whose deadline passed, hands each
batch to the model runner (up to :data:`BATCHES_AHEAD` at once) and passes the results to the reply
step. With ``max_delay_ms = 0`` (the default) a request never waits for a batch that is not coming:
batches form only while the model is busy.

Called by intake (``add``) and the worker (``run``, ``hand_back``); calls the runner and the replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable

import structlog

from producer.protocol import ErrorCode
from worker.batching import Batchable, pending_rows, take_batch
from worker.health import HealthState
from worker.jobs import Job, Reply
from worker.metrics import WorkerMetrics
from worker.model import Pipeline
from worker.replies import Replies, clip
from worker.runner import ModelRunner, RunResult
from worker.settings import Settings
from worker.tracing import log_ids, model_run

log = structlog.get_logger("worker")

BATCHES_AHEAD = 2  # batches handed to the model thread at once: one running, one queued behind it
DELIVERY_TURNS = 3  # event-loop turns a delivery read from the socket needs to reach intake
IDLE_CHECK_S = 0.1  # how often an idle --exit-when-idle worker asks the broker whether the queue is empty


def is_expired(deadline_ms: float | None, now_ms: float) -> bool:
    """True when a request has a deadline and it has passed."""
    return deadline_ms is not None and now_ms > deadline_ms


class Scheduler:
    """Turns pending requests into model runs.

    Args:
        unsettled: how many deliveries the worker holds unsettled (the ack ledger's size).
        queue_empty: for ``exit_when_idle``: whether nothing is left here or in the queue.
    """

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        *,
        runner: ModelRunner,
        replies: Replies,
        metrics: WorkerMetrics,
        health: HealthState,
        unsettled: Callable[[], int],
        queue_empty: Callable[[], Awaitable[bool]],
    ) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._runner = runner
        self._replies = replies
        self._metrics = metrics
        self._health = health
        self._unsettled = unsettled
        self._queue_empty = queue_empty
        self.pending: deque[Batchable[Job]] = deque()
        self._wakeup = asyncio.Event()
        self.batches_run = 0
        self.rows_run = 0

    def add(self, job: Job) -> None:
        """Queue a prepared job (``job.request`` and ``job.prepared`` set) for a batch."""
        assert job.request is not None
        # A suspect never shares a model run: if it kills the process, only it was computing.
        key = ("suspect", job.message.delivery_tag) if job.suspect else self._pipeline.batch_key(job.prepared)
        length = self._pipeline.padding_length(job.prepared)
        self.pending.append(Batchable(job, rows=job.request.rows, key=key, length=length))
        self._wakeup.set()

    def poke(self) -> None:
        """Wake the loop when nothing is pending (a task ended: the worker may have gone idle)."""
        if not self.pending:
            self._wakeup.set()

    def hand_back(self) -> list[Job]:
        """Remove and return every job not yet handed to the model (the drain requeues them)."""
        jobs = [item.item for item in self.pending]
        self.pending.clear()
        self._wakeup.set()
        return jobs

    async def run(self) -> None:
        """The batch loop: until draining, or (``exit_when_idle``) until the queue is empty."""
        s = self._settings
        run = self._pipeline.run
        # Batches handed to the model thread, oldest first. Up to BATCHES_AHEAD: while one runs,
        # the next waits in the executor's queue, so the model never idles while the loop encodes
        # and publishes the previous batch's replies.
        computing: deque[tuple[list[Job], asyncio.Future[RunResult]]] = deque()
        while not self._health.draining:
            if computing and (len(computing) >= BATCHES_AHEAD or not self.pending):
                jobs, future = computing.popleft()
                self._finish_batch(jobs, await future)
                continue
            if not self.pending:
                self._wakeup.clear()
                if s.exit_when_idle:
                    if await self._queue_empty():
                        log.info("queue_empty_exiting", queue=s.queue)
                        return
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), IDLE_CHECK_S)
                else:
                    await self._wakeup.wait()
                continue
            if self._unsettled() > len(self.pending) and pending_rows(self.pending) < s.max_batch:
                # Busy with other requests (computing, or replies in flight): let deliveries already
                # read from the socket reach intake first. A few loop turns (frame -> aiormq task ->
                # aio-pika task -> callback), no waiting on a clock; at saturation this turns many
                # tiny batches into few. A lone request skips it.
                for _ in range(DELIVERY_TURNS):
                    await asyncio.sleep(0)
            if s.max_delay_ms > 0 and pending_rows(self.pending) < s.max_batch:
                await self._linger(self.pending[0].item.received_s + s.max_delay_ms / 1000.0)
                if self._health.draining:
                    break
            jobs = take_batch(self.pending, s.max_batch)
            now_ms = time.time() * 1000.0
            expired = [j for j in jobs if is_expired(j.deadline_ms, now_ms)]
            if expired:
                self._replies.send_soon([self._replies.deadline_error(j, now_ms) for j in expired])
                jobs = [j for j in jobs if not is_expired(j.deadline_ms, now_ms)]
                if not jobs:
                    continue
            prepared = [j.prepared for j in jobs]
            if self._runner.inline:
                self._finish_batch(jobs, self._runner.run_inline(run, prepared))
            else:
                computing.append((jobs, self._runner.submit(run, prepared)))
        while computing:  # draining: finish what the model thread has, so its replies go out
            jobs, future = computing.popleft()
            self._finish_batch(jobs, await future)

    def _finish_batch(self, jobs: list[Job], result: RunResult) -> None:
        """Record a finished model run and send its replies (in a task of their own)."""
        results, started, compute_s = result
        finished = time.monotonic()
        rows = sum(j.request.rows for j in jobs if j.request is not None)
        self.batches_run += 1
        self.rows_run += rows
        m = self._metrics
        m.compute_seconds.observe(compute_s)
        m.batch_rows.observe(rows)
        m.batch_requests.observe(len(jobs))
        m.rows.inc(rows)
        model_run(
            jobs,
            started_s=started,
            compute_s=compute_s,
            rows=rows,
            model=self._pipeline.name,
            device=self._pipeline.providers[0],
        )
        timing = {"batch_rows": rows, "batch_requests": len(jobs), "compute_ms": round(compute_s * 1e3, 3)}
        replies: list[Reply] = []
        for job, outputs in zip(jobs, results, strict=True):
            wait_s = started - job.received_s
            m.batch_wait_seconds.observe(wait_s)
            if isinstance(outputs, Exception):
                log.warning("inference_failed", request_id=clip(job.request_id), error=clip(outputs), **log_ids(job))
                replies.append(
                    self._replies.error(
                        job, ErrorCode.INFERENCE_FAILED, f"the model failed on this request: {clip(str(outputs))}"
                    )
                )
            else:
                timing_here = {**timing, "batch_wait_ms": round(wait_s * 1e3, 3)}
                replies.append(self._replies.result(job, outputs, timing_here))
        self._replies.send_soon(replies, finished_s=finished)

    async def _linger(self, until_s: float) -> None:
        """Wait for more rows until ``until_s`` (monotonic), a full batch, or draining."""
        while pending_rows(self.pending) < self._settings.max_batch and not self._health.draining:
            remaining = until_s - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return
