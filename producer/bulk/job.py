"""Bulk jobs: stream a JSONL file through the workers into a JSONL file, resumable after a crash.

How a job survives restarts:

* Replies go to a durable quorum queue per job (:func:`producer.wire.names.results_queue`), declared
  before the first request, so replies that arrive while the producer is down wait there. The
  queue is never deleted by the job: the broker drops it once it has been unused for
  ``results_ttl_s`` (``x-expires``), so a late reply always finds it.
* The output file and a small state file beside it (the job's secret and pinned version,
  :mod:`producer.bulk.state`) are the job's other state: a rerun with the same job id skips every
  row already in the output, first collects the replies waiting in the results queue, then
  sends the rest.
* Each request body's ``id`` names its rows (:mod:`producer.bulk.signed_ids`), so a reply
  to a request sent before the restart still maps back to its rows. A row is written at most
  once (the output is checked by id) and a run ends only when every row is written, so each
  input row appears in the output exactly once.

Who may write: one run per output file (an advisory ``flock`` on the output, local) and one run
per job id (an exclusive queue on the broker, :func:`producer.wire.names.job_lock_queue`, freed by the
broker when its owner's connection dies, SIGKILL included). A second run refuses at once. What
is written: only replies whose ids carry the job's HMAC tag (:class:`producer.bulk.signed_ids.RequestSigner`);
any other message in the results queue is acked, logged, counted as ``forged`` and dropped.

Model versions: with ``model``, requests go to the model's route, and the whole job is pinned to one
version, so one output never mixes embeddings of two versions: ``version`` when given, else the
version that answered the job's first request (one request is in flight until then). The version is
recorded in the job's state file, so a rerun keeps it.

Flow control: at most ``max_in_flight`` packed requests are outstanding (published and not yet
written); the input is read one line at a time. Publishes use publisher confirms and
``mandatory`` (a missing request queue fails the job instead of losing requests).

A request that gets an error reply while carrying several rows is split in halves and sent
again, so one bad row is reported on its own and its neighbours still get results.

This module owns the run: the output lock, the order of the start (locks, connections, results queue,
collecting what waits), the run loop (scan, pack, send within the window; the reply loop: write, flush, ack),
the splitting of failed requests and the job's failure. It calls :mod:`producer.bulk.broker` (connections, the
job lock, the results queue), :mod:`producer.bulk.ledger` (each row's fate), :mod:`producer.bulk.replies` (a
reply's checks), :mod:`producer.bulk.state` (secret, pinned version) and :mod:`producer.amqp.publish`. Called by
``producer bulk`` (:mod:`producer.bulk.cli`) and library users.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import time
import uuid
from typing import IO, Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
from opentelemetry import trace

from producer.amqp.logs import get_logger
from producer.amqp.messages import request_message
from producer.amqp.publish import Refusal, Target, publish_request, resolve_target
from producer.amqp.tasks import TaskSet
from producer.amqp.tracing import start_publish, tracer
from producer.bulk.broker import connect, declare_results_queue, lock_job
from producer.bulk.jsonl import Packer, Row, batch_inputs, count_rows, error_line, iter_input, parse_row, read_output
from producer.bulk.ledger import RowLedger
from producer.bulk.options import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_ROWS_PER_MESSAGE,
    BulkOptions,
    BulkSummary,
    JobFailedError,
    JobLockedError,
    ProgressSink,
    default_job_id,
)
from producer.bulk.replies import ReplyHandler, Sent
from producer.bulk.signed_ids import RequestSigner
from producer.bulk.state import JobState
from producer.wire.errors import ConnectionLostError, PublishRefusedError
from producer.wire.names import results_queue
from producer.wire.protocol import ErrorCode, encode_request

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_ROWS_PER_MESSAGE",
    "BulkJob",
    "BulkOptions",
    "BulkSummary",
    "JobFailedError",
    "JobLockedError",
    "ProgressSink",
    "default_job_id",
]

log = get_logger("bulk")

_ACK_BATCH = 256


class BulkJob:
    """One run of a bulk job. ``await BulkJob(options).run()`` returns a :class:`BulkSummary`.

    Raises from :meth:`run`:
        JobFailedError: the job cannot go on; the results queue is kept, so a rerun resumes.
    """

    def __init__(self, options: BulkOptions, progress: ProgressSink | None = None) -> None:
        self.options = options
        self.job_id = options.resolved_job_id
        self.results_queue = results_queue(self.job_id)
        self.summary = BulkSummary(job_id=self.job_id)
        self._progress = progress
        self._nonce = uuid.uuid4().hex[:8]
        self._seq = 0
        self._state = JobState(
            options.output_path, self.job_id, model=options.model, version=options.version, summary=self.summary
        )
        self._ledger = RowLedger(
            options.order,
            self.summary,
            write=self._write_line,
            unit_done=self._unit_done,
            finished=self._all_written,
            progress=progress,
        )
        self._replies: ReplyHandler | None = None
        self._signer: RequestSigner | None = None
        self._packer = Packer(options.rows_per_message)
        self._window = asyncio.Semaphore(options.max_in_flight)
        self._tasks = TaskSet(on_error=self._fail)
        self._inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        self._collected_waiting: asyncio.Future[None] | None = None
        self._finished: asyncio.Future[None] | None = None
        self._out: IO[bytes] | None = None
        self._publish_channel: aio_pika.abc.AbstractChannel | None = None
        self._reply_seen: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------------------------------
    # The run

    async def run(self) -> BulkSummary:
        """Run (or resume) the job to completion; the results queue is kept (it expires on its own).

        Raises:
            JobLockedError: another run of this job, or another job writing this output, is running.
            JobFailedError: the job cannot go on; rerun to resume.
        """
        opts = self.options
        started_s = time.monotonic()
        self._finished = asyncio.get_running_loop().create_future()
        with self._locked_output() as self._out:
            self._signer = RequestSigner(self._state.secret(), self.job_id)
            self._replies = ReplyHandler(self._signer, self._ledger, self._state, self.summary, on_error=self._on_error)
            self._state.pin_recorded_version()
            state = read_output(opts.output_path)
            self._ledger.restore(state)
            self.summary.failed_before = state.failed
            self.summary.skipped = state.rows
            if self._progress is not None:
                self._progress.start(max(0, count_rows(opts.input_path) - state.rows))
            log.info("bulk_start", job_id=self.job_id, queue=opts.queue, already_done=state.rows)
            publisher = await connect(opts.amqp_url, opts.tls, self.job_id, "publish")
            try:
                consumer = await connect(opts.amqp_url, opts.tls, self.job_id, "collect")
            except JobFailedError:
                await publisher.close()
                raise
            try:
                for connection in (publisher, consumer):
                    connection.close_callbacks.add(self._on_connection_closed)
                await self._run(publisher, consumer)
                self._out.flush()
            finally:
                finished = self._finished_future()
                if not finished.done():
                    finished.cancel()  # closing the connections below must not record a failure
                await self._tasks.cancel_all()
                for connection in (publisher, consumer):
                    connection.close_callbacks.discard(self._on_connection_closed)
                    await connection.close()
        self.summary.elapsed_s = time.monotonic() - started_s
        log.info(
            "bulk_done",
            job_id=self.job_id,
            written=self.summary.written,
            failed=self.summary.failed,
            forged=self.summary.forged,
        )
        return self.summary

    @contextlib.contextmanager
    def _locked_output(self) -> collections.abc.Iterator[IO[bytes]]:
        """The output file, open for appending, under an exclusive advisory lock held until the run ends.

        The lock keeps a second run on this machine (same job, or another job id pointed at the
        same file) from writing or truncating the file while this one writes it.
        """
        path = self.options.output_path
        try:
            out = path.open("ab")
        except OSError as e:
            raise JobFailedError(f"cannot open the output file {path}: {e.strerror}") from e
        with out:
            try:
                fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise JobLockedError(
                    f"job {self.job_id} not started: another producer bulk process is writing {path} (it holds the "
                    "file's lock). Wait for it to finish, or stop it, then run this command again to resume."
                ) from e
            yield out

    def _target(self) -> Target:
        """Where the job's requests go: its queue, its pinned version, or its model's route."""
        return resolve_target(queue=self.options.queue, model=self.options.model, version=self._state.version)

    async def _wait_for_version(self) -> None:
        """Until the job's version is known, one request at a time: the version its reply names pins the job."""
        assert self._replies is not None
        while self.options.model is not None and self._state.version is None and self._replies.requests:
            self._reply_seen = asyncio.get_running_loop().create_future()
            await self._wait(self._reply_seen)

    async def _run(self, publisher: aio_pika.abc.AbstractConnection, consumer: aio_pika.abc.AbstractConnection) -> None:
        opts = self.options
        await lock_job(consumer, self.job_id)
        self._publish_channel = await publisher.channel(publisher_confirms=True, on_return_raises=True)
        channel, queue = await declare_results_queue(consumer, self.job_id, opts.results_ttl_s)
        await channel.set_qos(prefetch_count=min(65535, 2 * opts.max_in_flight + 16))
        waiting = queue.declaration_result.message_count or 0
        for ch in (self._publish_channel, channel):
            ch.close_callbacks.add(self._on_connection_closed)
        self._collected_waiting = asyncio.get_running_loop().create_future()
        consumer_tag = await queue.consume(self._on_message)
        self._tasks.spawn(self._handle_replies(waiting_at_start=waiting))
        if waiting:
            log.info("bulk_collecting", job_id=self.job_id, waiting=waiting)
            assert self._collected_waiting is not None
            await self._wait(self._collected_waiting)
        await self._scan()
        self._ledger.end_scan()
        await self._wait(self._finished_future())
        await queue.cancel(consumer_tag)

    def _finished_future(self) -> asyncio.Future[None]:
        assert self._finished is not None
        return self._finished

    async def _wait(self, future: asyncio.Future[Any]) -> None:
        """Wait for ``future``, or raise the job's failure if that comes first."""
        finished = self._finished_future()
        if future is not finished:
            await asyncio.wait([future, finished], return_when=asyncio.FIRST_COMPLETED)
            if finished.done():
                finished.result()
        await future

    def _fail(self, error: BaseException) -> None:
        finished = self._finished_future()
        if not finished.done():
            if not isinstance(error, JobFailedError):
                error = JobFailedError(f"{error}; rerun with --job-id {self.job_id} to resume")
            finished.set_exception(error)

    def _on_connection_closed(self, _sender: object, exc: BaseException | None) -> None:
        self._fail(ConnectionLostError(f"the broker connection closed ({exc or 'closed'})"))

    def _all_written(self) -> None:
        finished = self._finished_future()
        if not finished.done():
            finished.set_result(None)

    # ------------------------------------------------------------------------------------------
    # Sending

    async def _scan(self) -> None:
        opts = self.options
        packer = self._packer
        for line, text in iter_input(opts.input_path):
            self.summary.input_rows += 1
            parsed = parse_row(
                line,
                text,
                text_input=opts.text_input,
                default_datatype=opts.default_datatype,
                datatypes=opts.datatypes,
            )
            row = self._ledger.admit(parsed)
            if row is not None:
                for group in packer.add(row):
                    await self._send(group)
            if self._finished_future().done():
                self._finished_future().result()
        last = packer.flush()
        if last:
            await self._send(last)

    async def _send(self, group: list[Row]) -> None:
        await self._wait_for_version()
        await self._wait_for_window()
        # Rows answered meanwhile by an earlier run's request need no request.
        rows = self._ledger.unanswered(group)
        if not rows:
            self._window.release()
            return
        self._ledger.start_unit(rows)
        self._publish(rows)
        await asyncio.sleep(0)  # let replies and confirms in between publishes

    async def _wait_for_window(self) -> None:
        if not self._window.locked():
            await self._window.acquire()  # free: returns at once
            return
        acquire = asyncio.ensure_future(self._window.acquire())
        try:
            await self._wait(acquire)
        finally:
            if not acquire.done():
                acquire.cancel()

    def _unit_done(self) -> None:
        self._window.release()

    def _publish(self, rows: list[Row]) -> None:
        opts = self.options
        assert self._signer is not None
        assert self._replies is not None
        self._seq += 1
        ids = self._signer.sign(f"{self._nonce}.{self._seq}", rows)
        body = encode_request(batch_inputs(rows), opts.content_type, request_id=ids.body_id)
        message = request_message(
            body,
            request_id=ids.correlation_id,
            content_type=opts.content_type,
            reply_to=self.results_queue,
            persistent=True,
        )
        self._replies.requests[ids.correlation_id] = Sent(rows, ids.body_id)
        self.summary.messages += 1
        self._tasks.spawn(self._publish_one(message))

    async def _publish_one(self, message: aio_pika.Message) -> None:
        assert self._publish_channel is not None
        target = self._target()
        span = start_publish(tracer(), message, target.routing_key)  # ends at the broker's confirm: replies come later
        try:
            with trace.use_span(span, end_on_exit=True):
                await publish_request(self._publish_channel, message, target)
        except PublishRefusedError as e:
            raise PublishRefusedError(self._refusal_advice(e, target), reason=e.reason) from e.__cause__

    def _refusal_advice(self, error: PublishRefusedError, target: Target) -> str:
        """What a refused publish means for the job, and what to do before the rerun."""
        if error.reason == Refusal.UNPINNED:
            return (
                f"no version of model {self.options.model!r} takes unpinned requests (every weight is 0): "
                "pass --version, or give a version a weight, and rerun"
            )
        if error.reason in (Refusal.NO_QUEUE, Refusal.NO_VERSION_QUEUE):
            return f"no queue named {target.routing_key!r}: start a worker for it (it declares the queue) and rerun"
        if error.reason == Refusal.NACKED:
            return f"the broker refused a request to {target.where} (nack)"
        return str(error)

    def _on_error(self, rows: list[Row], code: str, message: str) -> None:
        """A request of this run failed: split its unanswered rows in halves and resend, or report the one row."""
        unresolved = self._ledger.unanswered(rows)
        if len(unresolved) > 1:
            self.summary.splits += 1
            half = len(unresolved) // 2
            if code == ErrorCode.TOO_MANY_ROWS and half < self._packer.rows_per_message:
                # The workers take fewer rows per request than asked: pack fewer from now on.
                log.warning("bulk_rows_per_message_lowered", job_id=self.job_id, rows_per_message=half)
                self._packer.rows_per_message = half
            self._publish(unresolved[:half])
            self._publish(unresolved[half:])
            return
        for row in unresolved:
            self._ledger.resolve(row.id, error_line(row.line, row.id, code, message), code, earlier_run=False)

    # ------------------------------------------------------------------------------------------
    # Receiving and writing

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self._inbox.put_nowait(message)

    async def _handle_replies(self, waiting_at_start: int) -> None:
        """Handle replies in arrival order: write their rows, flush the file, then ack.

        Replies that arrived together are written with one flush and acked with one
        ``multiple`` ack (this consumer is alone on its channel, so earlier tags are all handled).
        """
        assert self._replies is not None
        handled = 0
        while True:
            batch = [await self._inbox.get()]
            while not self._inbox.empty() and len(batch) < _ACK_BATCH:
                batch.append(self._inbox.get_nowait())
            for message in batch:
                self._replies.handle(message.correlation_id or "", message.body, message.content_type)
            if self._reply_seen is not None and not self._reply_seen.done():
                self._reply_seen.set_result(None)
            assert self._out is not None
            self._out.flush()
            await batch[-1].ack(multiple=True)
            before, handled = handled, handled + len(batch)
            if before < waiting_at_start <= handled and self._collected_waiting is not None:
                self._collected_waiting.set_result(None)

    def _write_line(self, text: bytes) -> None:
        assert self._out is not None
        self._out.write(text)
