"""Taking in deliveries: every byte, header and reply_to is checked before work is spent on it.

For each delivery, in order of cost: record it in the ack ledger; classify its reply_to (a request
nobody may be answered for is dead-lettered); hand it back if the worker is draining; answer it at
once if its deadline passed or its body is over ``WORKER_MAX_MESSAGE_BYTES``; answer a metadata request
(``x-qinfer-kind: metadata``) with the model's metadata, no model run; then decode and
prepare it (validate, tokenize), on the event loop for small bodies and in the intake thread for
large ones, and queue it for a batch. Whatever is raised on the way ends in an error reply (or a
dead-letter): no delivery is ever left unsettled.

Called by aio-pika for each delivery (``on_message``); calls the replies, the settler and the scheduler.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage

from producer.amqp.tasks import TaskSet
from producer.wire.errors import ProtocolError
from producer.wire.metadata import MAX_METADATA_REQUEST_BYTES, is_metadata_request
from producer.wire.names import HEADER_DEADLINE_MS, HEADER_DELIVERY_COUNT, HEADER_PUBLISHED_MS
from producer.wire.protocol import ErrorCode, InferRequest, decode_request
from worker.acks import Outcome
from worker.answering import Replies, clip
from worker.health import HealthState
from worker.jobs import Job
from worker.metadata import MetadataReplies
from worker.metrics import WorkerMetrics
from worker.pipelines.tensor import Pipeline
from worker.reply_to import ReplyTo, ReplyToKind, classify
from worker.scheduler import Scheduler, is_expired
from worker.settings import Settings
from worker.settler import Settler
from worker.tracing import WorkerTracing, decoding, enqueued, job_context

log = structlog.get_logger("worker")

# Bodies up to this size are decoded and prepared (tokenized) on the event loop: at most a few
# milliseconds. Larger ones go to the intake thread, so a long text never stalls acks, heartbeats
# or /livez.
INLINE_PREPARE_BYTES = 64 * 1024
_REPLY_TO_MEMORY = 4096  # distinct reply_to values remembered (then forgotten all at once)


def header_ms(headers: Mapping[str, Any] | None, name: str) -> float | None:
    """A millisecond timestamp header as a float, or None when absent or not a number."""
    value = headers.get(name) if headers else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class Intake:
    """Turns deliveries into jobs queued for a batch, or into their error reply or dead-letter.

    Args:
        on_redelivered: called for a delivery the broker marks redelivered (a suspect).
        on_first_delivery: called for a delivery seen for the first time.
        tracing: starts each delivery's span (default: from the global tracer provider).
    """

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        *,
        settler: Settler,
        replies: Replies,
        scheduler: Scheduler,
        tasks: TaskSet,
        metrics: WorkerMetrics,
        health: HealthState,
        on_redelivered: Callable[[], None],
        on_first_delivery: Callable[[], None],
        tracing: WorkerTracing | None = None,
    ) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._settler = settler
        self._replies = replies
        self._scheduler = scheduler
        self._tasks = tasks
        self._metrics = metrics
        self._health = health
        self._on_redelivered = on_redelivered
        self._on_first_delivery = on_first_delivery
        self._reply_to_pattern = re.compile(settings.reply_to_pattern)
        # reply_to values repeat (one per client channel or results queue): classify each once.
        self._reply_to_seen: dict[str | None, ReplyTo] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake")
        self._tracing = tracing or WorkerTracing(settings.queue)
        self._metadata = MetadataReplies(pipeline, settings)

    def shutdown(self) -> None:
        """Stop the intake thread; requests it had not started are settled by the drain or the channel close."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """Take in one delivery. Whatever it holds, it ends settled: replied to, or dead-lettered."""
        job = Job(
            message=message,
            ledger=self._settler.admit(message),
            request_id=message.correlation_id or message.message_id or "",
            received_s=time.monotonic(),
        )
        self._tracing.receive(job)
        with job_context(job):
            try:
                if not self._screen(job):
                    return
                if len(message.body) <= INLINE_PREPARE_BYTES:
                    request, prepared = self._decode(job)
                    self._enqueue(job, request, prepared)
                else:
                    self._tasks.spawn(self._take_in_off_loop(job))
            except Exception as e:  # whatever the delivery made raise, it still ends settled
                self._failed(job, e)

    def _failed(self, job: Job, error: Exception) -> None:
        """Turn anything raised while taking in ``job`` into its error reply (or dead-letter)."""
        if isinstance(error, ProtocolError):
            log.warning("bad_request", request_id=clip(job.request_id), code=error.code, error=clip(error.message))
            self._replies.send_soon([self._replies.error(job, error.code, error.message)])
            return
        # A bug or an input nobody foresaw: answer it, never leave it unsettled.
        log.error("intake_failed", request_id=clip(job.request_id), error=clip(error), exc_info=error)
        if job.reply_to is None:
            job.reply_to = self._classify(job.message.reply_to)
        if job.reply_to.answerable:
            text = f"the worker could not take in this request ({type(error).__name__}); it was not computed"
            self._replies.send_soon([self._replies.error(job, ErrorCode.INTERNAL, text)])
        else:
            self._tasks.spawn(self._settler.settle([(job, Outcome.BAD_REPLY_TO)]))

    def _screen(self, job: Job) -> bool:
        """The checks that cost nothing: suspects, reply_to, draining, deadline, size.

        Returns False when the job was answered or settled here (no decoding needed).
        """
        message = job.message
        if message.redelivered:
            self._metrics.redelivered.inc()
            count = message.headers.get(HEADER_DELIVERY_COUNT) if message.headers else None
            log.info("redelivered", request_id=clip(job.request_id), delivery_count=clip(count))
            job.suspect = True
            self._on_redelivered()
        else:
            self._on_first_delivery()
        job.reply_to = self._classify(message.reply_to)
        if not job.reply_to.answerable:
            missing = job.reply_to.kind is ReplyToKind.MISSING
            log.warning(
                "no_reply_to" if missing else "reply_to_refused",
                request_id=clip(job.request_id),
                reply_to=clip(message.reply_to or ""),
                action="dead-lettered",
                why=job.reply_to.reason,
            )
            outcome = Outcome.NO_REPLY_TO if missing else Outcome.BAD_REPLY_TO
            self._tasks.spawn(self._settler.settle([(job, outcome)]))
            return False
        if self._health.draining:
            self._tasks.spawn(self._settler.settle([(job, Outcome.NOT_STARTED)]))
            return False
        now_ms = time.time() * 1000.0
        published_ms = header_ms(message.headers, HEADER_PUBLISHED_MS)
        if published_ms is not None:
            job.broker_ms = max(0.0, now_ms - published_ms)
            self._metrics.broker_seconds.observe(job.broker_ms / 1000.0)
        job.deadline_ms = header_ms(message.headers, HEADER_DEADLINE_MS)
        if is_expired(job.deadline_ms, now_ms):
            self._replies.send_soon([self._replies.deadline_error(job, now_ms)])
            return False
        size = len(message.body)
        if size > self._settings.max_message_bytes:
            raise ProtocolError(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"the request body is {size} bytes; this worker accepts at most {self._settings.max_message_bytes} "
                "(split the request into smaller ones, or raise WORKER_MAX_MESSAGE_BYTES)",
            )
        if is_metadata_request(message.headers):
            self._answer_metadata(job)
            return False
        return True

    def _answer_metadata(self, job: Job) -> None:
        """Answer a metadata request with the model's metadata (no model run); settled like any reply."""
        size = len(job.message.body)
        if size > MAX_METADATA_REQUEST_BYTES:
            raise ProtocolError(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"a metadata request carries no body; this one has {size} bytes "
                f"(at most {MAX_METADATA_REQUEST_BYTES} accepted)",
            )
        body, content_type = self._metadata.body(job.message.content_type)
        log.debug("metadata_request", request_id=clip(job.request_id))
        self._replies.send_soon([self._replies.prebuilt(job, body, content_type, "metadata")])

    def _classify(self, reply_to: str | None) -> ReplyTo:
        """:func:`classify`, remembered for the last few thousand distinct values."""
        known = self._reply_to_seen.get(reply_to)
        if known is None:
            if len(self._reply_to_seen) >= _REPLY_TO_MEMORY:
                self._reply_to_seen.clear()
            known = self._reply_to_seen[reply_to] = classify(reply_to, self._reply_to_pattern)
        return known

    def _decode(self, job: Job) -> tuple[InferRequest, Any]:
        """Decode and prepare (validate, tokenize) a request. Pure: safe to run in the intake thread."""
        message = job.message
        with decoding(job):
            request = decode_request(message.body, message.content_type, default_id=job.request_id)
            job.request_id = request.id
            return request, self._pipeline.prepare(request, max_rows=self._settings.max_batch)

    async def _take_in_off_loop(self, job: Job) -> None:
        """Decode and prepare a large request in the intake thread, then queue it for a batch."""
        with job_context(job):
            try:
                loop = asyncio.get_running_loop()
                request, prepared = await loop.run_in_executor(self._executor, self._decode, job)
                if self._health.draining:  # the drain began meanwhile and has handed back the pending work
                    await self._settler.settle([(job, Outcome.NOT_STARTED)])
                    return
                self._enqueue(job, request, prepared)
            except Exception as e:
                self._failed(job, e)

    def _enqueue(self, job: Job, request: InferRequest, prepared: Any) -> None:
        """Queue a prepared request for a batch (or answer it if its deadline passed meanwhile)."""
        now_ms = time.time() * 1000.0
        if is_expired(job.deadline_ms, now_ms):
            self._replies.send_soon([self._replies.deadline_error(job, now_ms)])
            return
        job.request = request
        job.prepared = prepared
        enqueued(job)
        self._scheduler.add(job)
