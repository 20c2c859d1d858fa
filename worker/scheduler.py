"""Forming batches and keeping the model busy: the worker's batch loop.

Owns the rows waiting for a batch (``pending``, a :class:`worker.batching.PendingRows` of
:class:`worker.jobs.Piece`) and the loop that takes batches of compatible rows from them, skips
requests whose deadline passed before any of their rows started, hands each batch to the model
runner (up to :data:`BATCHES_AHEAD` at once) and passes each request, once its last row is done
(:class:`worker.assembly.Assembly`), to the reply step. With ``max_delay_ms = 0`` (the default) a
request never waits for a batch that is not coming: batches form only while the model is busy.

``--schedule rows`` (the default) splits each request into the pipeline's pieces (text: one per row;
tensors: the whole request, whose first rows fill a batch that has less room), so rows of many
requests share a run and texts group by length across requests. ``--schedule requests`` batches
whole requests. Either way a request gets one reply and one ack decision: a failing piece fails only
its own request (``inference_failed``, once; its other pieces are dropped), and a drain hands back
every request with rows still waiting (results of its rows already computing are ignored) while the
requests whose rows are all computing are answered.

Called by intake (``add``) and the worker (``run``, ``hand_back``); calls the runner and the replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable

import structlog

from producer.wire.protocol import ErrorCode
from worker.answering import Replies, clip
from worker.assembly import Assembly
from worker.batching import PendingRows
from worker.health import HealthState
from worker.jobs import Job, Piece, Reply
from worker.metrics import WorkerMetrics
from worker.pipelines.tensor import Pipeline
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
    """Turns pending rows into model runs, and finished requests into replies.

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
        self._by_rows = settings.schedule == "rows"
        self.pending: PendingRows[Piece] = PendingRows(self._split if self._by_rows else None)
        self._jobs_waiting = 0  # jobs with at least one piece in pending
        self._wakeup = asyncio.Event()
        self._runs = 0
        self.batches_run = 0
        self.rows_run = 0

    def add(self, job: Job) -> None:
        """Queue a prepared job (``job.request`` and ``job.prepared`` set) for batches."""
        assert job.request is not None
        prepared = job.prepared
        # A suspect never shares a model run with another request: if it kills the process, only it
        # was computing. Its own pieces share a key, so they still run together.
        key = ("suspect", job.message.delivery_tag) if job.suspect else self._pipeline.batch_key(prepared)
        if self._by_rows:
            parts = self._pipeline.pieces(prepared)
            first_row = 0
            for part in parts:
                piece = Piece(job, first_row, part.rows, part.data)
                self.pending.add(piece, rows=part.rows, key=key, length=part.length)
                first_row += part.rows
            job.pieces_waiting = len(parts)
            job.assembly = Assembly(first_row)
        else:
            rows = job.request.rows
            length = self._pipeline.padding_length(prepared)
            self.pending.add(Piece(job, 0, rows, prepared), rows=rows, key=key, length=length)
            job.pieces_waiting = 1
            job.assembly = Assembly(rows)
        self._jobs_waiting += 1
        self._wakeup.set()

    def _split(self, piece: Piece, rows: int) -> tuple[Piece, Piece]:
        """A piece's first ``rows`` rows (for a batch with that much room) and the rest (keeps its place)."""
        head, tail = self._pipeline.split(piece.part, rows)
        piece.job.pieces_waiting += 1  # the head is taken at once; the tail still waits
        return (
            Piece(piece.job, piece.first_row, rows, head),
            Piece(piece.job, piece.first_row + rows, piece.rows - rows, tail),
        )

    def poke(self) -> None:
        """Wake the loop when nothing is pending (a task ended: the worker may have gone idle)."""
        if not self.pending:
            self._wakeup.set()

    def hand_back(self) -> list[Job]:
        """Remove every piece not yet handed to the model; return the jobs to hand back (the drain requeues them).

        A job with any row still waiting is handed back whole, even when some of its rows are
        computing: their results are ignored when they come. Jobs whose rows are all computing are
        answered as usual.
        """
        jobs: list[Job] = []
        for piece in self.pending.clear():
            job = piece.job
            job.pieces_waiting = 0
            if job.assembly is not None and job.assembly.close():
                jobs.append(job)
        self._jobs_waiting = 0
        self._wakeup.set()
        return jobs

    async def run(self) -> None:
        """The batch loop: until draining, or (``exit_when_idle``) until the queue is empty."""
        s = self._settings
        run = self._pipeline.run
        # Batches handed to the model thread, oldest first. Up to BATCHES_AHEAD: while one runs,
        # the next waits in the executor's queue, so the model never idles while the loop encodes
        # and publishes the previous batch's replies.
        computing: deque[tuple[list[Piece], asyncio.Future[RunResult]]] = deque()
        while not self._health.draining:
            if computing and (len(computing) >= BATCHES_AHEAD or not self.pending):
                pieces, future = computing.popleft()
                self._finish_batch(pieces, await future)
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
            if self._unsettled() > self._jobs_waiting and self.pending.rows < s.max_batch:
                # Busy with other requests (computing, or replies in flight): let deliveries already
                # read from the socket reach intake first. A few loop turns (frame -> aiormq task ->
                # aio-pika task -> callback), no waiting on a clock; at saturation this turns many
                # tiny batches into few. A lone request skips it.
                for _ in range(DELIVERY_TURNS):
                    await asyncio.sleep(0)
            if s.max_delay_ms > 0 and self.pending.rows < s.max_batch:
                oldest = self.pending.oldest()
                assert oldest is not None
                await self._linger(oldest.job.received_s + s.max_delay_ms / 1000.0)
                if self._health.draining:
                    break
            pieces = self._next_batch()
            if not pieces:
                continue
            parts = [p.part for p in pieces]
            if self._runner.inline:
                self._finish_batch(pieces, self._runner.run_inline(run, parts))
            else:
                computing.append((pieces, self._runner.submit(run, parts)))
        while computing:  # draining: finish what the model thread has, so its replies go out
            pieces, future = computing.popleft()
            self._finish_batch(pieces, await future)

    def _next_batch(self) -> list[Piece]:
        """Take the next batch of pieces; drop those of ended jobs, answer jobs that expired before starting."""
        taken = self.pending.take(self._settings.max_batch)
        now_ms = time.time() * 1000.0
        batch: list[Piece] = []
        late: list[Reply] = []
        for piece in taken:
            job = piece.job
            job.pieces_waiting -= 1
            if job.pieces_waiting == 0:
                self._jobs_waiting -= 1
            assembly = job.assembly
            assert assembly is not None
            if not assembly.open:
                continue  # failed or answered already: the rest of its rows are not computed
            if not assembly.started and is_expired(job.deadline_ms, now_ms):
                assembly.close()
                late.append(self._replies.deadline_error(job, now_ms))
                continue
            batch.append(piece)
        if late:
            self._replies.send_soon(late)
        if batch:
            self._runs += 1
            for piece in batch:
                assert piece.job.assembly is not None
                piece.job.assembly.begin_run(self._runs)
        return batch

    def _finish_batch(self, pieces: list[Piece], result: RunResult) -> None:
        """Record a finished model run and send the replies of the requests it completed (in a task of their own)."""
        results, started, compute_s = result
        finished = time.monotonic()
        ended = started + compute_s
        rows = sum(p.rows for p in pieces)
        requests = len({id(p.job) for p in pieces})
        self.batches_run += 1
        self.rows_run += rows
        m = self._metrics
        m.compute_seconds.observe(compute_s)
        m.batch_rows.observe(rows)
        m.batch_requests.observe(requests)
        m.rows.inc(rows)
        model_run(
            list({id(p.job): p.job for p in pieces}.values()),
            started_s=started,
            compute_s=compute_s,
            rows=rows,
            model=self._pipeline.name,
            device=self._pipeline.providers[0],
        )
        replies: list[Reply] = []
        for piece, outputs in zip(pieces, results, strict=True):
            job = piece.job
            assembly = job.assembly
            assert assembly is not None
            assembly.ran(started, ended)
            if isinstance(outputs, Exception):
                if assembly.fail():
                    m.batch_wait_seconds.observe(started - job.received_s)
                    log.warning(
                        "inference_failed", request_id=clip(job.request_id), error=clip(outputs), **log_ids(job)
                    )
                    text = f"the model failed on this request: {clip(str(outputs))}"
                    replies.append(self._replies.error(job, ErrorCode.INFERENCE_FAILED, text))
            elif assembly.add(piece.first_row, piece.rows, outputs):
                first_started = assembly.started_s if assembly.started_s is not None else started
                wait_s = first_started - job.received_s
                m.batch_wait_seconds.observe(wait_s)
                timing = {
                    "batch_rows": rows,
                    "batch_requests": requests,
                    "compute_ms": round((ended - first_started) * 1e3, 3),
                    "batch_wait_ms": round(wait_s * 1e3, 3),
                    "runs": assembly.runs,
                }
                replies.append(self._replies.result(job, assembly.outputs(), timing))
        if replies:
            self._replies.send_soon(replies, finished_s=finished)

    async def _linger(self, until_s: float) -> None:
        """Wait for more rows until ``until_s`` (monotonic), a full batch, or draining."""
        while self.pending.rows < self._settings.max_batch and not self._health.draining:
            remaining = until_s - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return
