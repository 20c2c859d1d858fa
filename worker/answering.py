"""Answering requests: build each reply, publish it, and turn what the broker said into an outcome to settle.

Owns reply building (results, error replies, deadline errors: bounded in size), the mapping from a
publish's fate (:class:`worker.reply_publisher.Published`) to an :class:`worker.acks.Outcome`, and the hold
and retry of replies the broker refused. Publishing itself is ``worker.reply_publisher``'s; settling is
``worker.settler``'s.

Called by intake (error replies) and the scheduler (results, deadline errors); calls the replier
and the settler.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import structlog

from producer.amqp.tasks import TaskSet
from producer.wire.protocol import ErrorCode, encode_error, encode_reply, reply_content_type
from worker.acks import Outcome, reply_retry_delay_s
from worker.batching import Arrays
from worker.health import HealthState
from worker.jobs import Job, Reply
from worker.metrics import WorkerMetrics
from worker.reply_publisher import Outgoing, Published, Replier
from worker.settler import Settler, open_channel
from worker.tracing import error_reply, log_ids, publishing_reply

log = structlog.get_logger("worker")

# RabbitMQ's default max_message_size: a larger reply would make the broker close the channel.
MAX_REPLY_BYTES = 128 * 1024 * 1024
MAX_ERROR_CHARS = 2000  # longest error message in a reply
ECHO_CHARS = 200  # longest piece of a request echoed into a log line


def clip(value: object) -> str:
    """``value`` as text (``repr`` unless a string), cut to :data:`ECHO_CHARS` characters for a log line."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} characters)"


class Replies:
    """Builds, publishes and settles replies.

    Args:
        replier: publishes one reply and says what became of it.
        settler: settles each request once its reply's fate is known.
        tasks: owns the reply and retry tasks.
        metrics, health: the worker's (outcome counters, reply time; ``draining`` cuts holds short).
        stop_event: set when the worker stops; wakes held replies for a last try.
        model_name, model_version: what every result reply names.
        reply_hold_s: how long a refused reply is retried before its request is handed back.
    """

    def __init__(
        self,
        *,
        replier: Replier,
        settler: Settler,
        tasks: TaskSet,
        metrics: WorkerMetrics,
        health: HealthState,
        stop_event: asyncio.Event,
        model_name: str,
        model_version: str,
        reply_hold_s: float,
    ) -> None:
        self._replier = replier
        self._settler = settler
        self._tasks = tasks
        self._metrics = metrics
        self._health = health
        self._stop_event = stop_event
        self._model_name = model_name
        self._model_version = model_version
        self._reply_hold_s = reply_hold_s

    # Building

    def result(self, job: Job, outputs: Arrays, timing: dict[str, Any]) -> Reply:
        """The result reply for ``job`` (an error reply when it would exceed the broker's limit)."""
        if job.broker_ms is not None:
            timing["broker_ms"] = round(job.broker_ms, 3)
        content_type = reply_content_type(job.message.content_type)
        body = encode_reply(
            job.request_id,
            outputs,
            content_type,
            model_name=self._model_name,
            model_version=self._model_version,
            parameters={"timing": timing},
        )
        if len(body) > MAX_REPLY_BYTES:
            return self.error(
                job,
                ErrorCode.INTERNAL,
                f"the reply would be {len(body)} bytes, more than the broker accepts ({MAX_REPLY_BYTES}); "
                "send fewer rows per request, or ask for fewer outputs",
            )
        return Reply(job, body, content_type, "ok")

    def prebuilt(self, job: Job, body: bytes, content_type: str, outcome_label: str) -> Reply:
        """A reply whose body is already encoded (a metadata reply); ``outcome_label`` names it in metrics."""
        return Reply(job, body, content_type, outcome_label)

    def error(self, job: Job, code: str, message: str) -> Reply:
        """An error reply; the message is cut to :data:`MAX_ERROR_CHARS` whatever the raiser echoed."""
        if len(message) > MAX_ERROR_CHARS:
            message = f"{message[:MAX_ERROR_CHARS]}... (message cut at {MAX_ERROR_CHARS} characters)"
        content_type = reply_content_type(job.message.content_type)
        error_reply(job, str(code))
        return Reply(job, encode_error(job.request_id, code, message, content_type), content_type, str(code))

    def deadline_error(self, job: Job, now_ms: float) -> Reply:
        """The ``deadline_exceeded`` reply for a job whose deadline passed before it was computed."""
        late_ms = now_ms - (job.deadline_ms or now_ms)
        log.info("deadline_exceeded", request_id=clip(job.request_id), late_ms=round(late_ms, 1), **log_ids(job))
        return self.error(
            job,
            ErrorCode.DEADLINE_EXCEEDED,
            f"the request's deadline passed {late_ms:.0f} ms before it could be computed; it was not computed "
            "(give it a longer timeout, or add workers)",
        )

    # Sending

    def send_soon(self, replies: Sequence[Reply], finished_s: float | None = None) -> None:
        """Publish and settle ``replies`` in a task of their own."""
        self._tasks.spawn(self.send(replies, finished_s))

    async def send(self, replies: Sequence[Reply], finished_s: float | None = None) -> None:
        """Publish ``replies`` together, then settle each request by what became of its reply."""
        results: list[Published | BaseException]
        if len(replies) == 1:  # the common case at low load: no gather, no extra task
            results = [await self._publish(replies[0])]
        else:
            results = await asyncio.gather(*(self._publish(r) for r in replies), return_exceptions=True)
        if finished_s is not None:
            self._metrics.reply_seconds.observe(time.monotonic() - finished_s)
        settled: list[tuple[Job, Outcome]] = []
        for reply, published in zip(replies, results, strict=True):
            job = reply.job
            if published is Published.CONFIRMED:
                settled.append((job, Outcome.REPLIED))
                self._metrics.count(reply.outcome_label)
            elif published is Published.REFUSED:
                settled.append((job, self._refused(reply)))
            elif published is Published.UNROUTABLE or published is Published.FATAL_ADDRESS:
                unroutable = published is Published.UNROUTABLE
                log.warning(
                    "reply_unroutable" if unroutable else "reply_to_fatal",
                    request_id=clip(job.request_id),
                    **log_ids(job),
                    reply_to=job.message.reply_to,
                    action="dead-lettered",
                    why="the broker could not route the reply: its queue does not exist (NO_ROUTE)"
                    if unroutable
                    else "publishing to this direct reply-to address closed the broker connection: forged or stale",
                )
                settled.append((job, Outcome.REPLY_UNROUTABLE if unroutable else Outcome.REPLY_TO_FATAL))
            elif published is Published.LOST:
                settled.append((job, Outcome.REPLY_LOST))
            elif isinstance(published, Exception):
                log.warning("reply_lost", request_id=clip(job.request_id), error=repr(published), **log_ids(job))
                settled.append((job, Outcome.REPLY_LOST))
            else:
                raise published
        await self._settler.settle(settled)

    async def _publish(self, reply: Reply) -> Published:
        job = reply.job
        assert job.reply_to is not None
        with publishing_reply(job) as headers:
            return await self._replier.publish(
                Outgoing(reply.body, reply.content_type, job.message.correlation_id, job.reply_to, headers)
            )

    def _refused(self, reply: Reply) -> Outcome:
        """Hold a refused reply for another try, or hand its request back once held too long."""
        job = reply.job
        now_s = time.monotonic()
        if job.refused_since_s is None:
            job.refused_since_s = now_s
        too_long = self._health.draining or now_s - job.refused_since_s >= self._reply_hold_s
        log.warning(
            "reply_refused",
            request_id=clip(job.request_id),
            **log_ids(job),
            reply_to=job.message.reply_to,
            attempt=job.reply_attempts,
            action="hand back" if too_long else "hold and retry",
        )
        job.reply = reply
        return Outcome.REPLY_REFUSED_TOO_LONG if too_long else Outcome.REPLY_REFUSED

    def retry_soon(self, job: Job) -> None:
        """Publish a held job's reply again after a backoff (the settler's ``on_hold``)."""
        self._tasks.spawn(self._retry(job))

    async def _retry(self, job: Job) -> None:
        """Publish a refused reply again after a backoff; its request stays unacked meanwhile.

        Stopping (``stop_event``) cuts the wait short for one last try before the hand-back.
        """
        assert job.reply is not None
        delay_s = reply_retry_delay_s(job.reply_attempts)
        job.reply_attempts += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), delay_s)
        if open_channel(job.message) is None:  # the broker has requeued the request already
            await self._settler.settle([(job, Outcome.REPLY_LOST)])
            return
        await self.send([job.reply])
