"""The records that travel through the worker: one :class:`Job` per delivery, one :class:`Reply` per answer.

Data only. Created by ``worker.intake``; batched by ``worker.scheduler``; answered by
``worker.replies``; settled by ``worker.settler``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from opentelemetry.trace import Span, Tracer

from producer.protocol import InferRequest
from worker.acks import AckLedger
from worker.reply_to import ReplyTo


@dataclasses.dataclass(slots=True)
class Job:
    """One delivery on its way through the worker."""

    message: AbstractIncomingMessage
    ledger: AckLedger  # the ack ledger of the channel it came on
    request_id: str
    reply_to: ReplyTo | None = None  # classified at intake; None until then
    request: InferRequest | None = None
    prepared: Any = None  # what the pipeline runs for this request (see Pipeline.prepare)
    received_s: float = 0.0  # monotonic
    deadline_ms: float | None = None  # epoch ms
    broker_ms: float | None = None
    suspect: bool = False  # delivered before: it may be what crashed a worker, so it runs alone
    reply: Reply | None = None  # kept while the broker refuses it, to publish again
    refused_since_s: float | None = None  # monotonic
    reply_attempts: int = 0
    trace: JobTrace | None = None  # its spans; None with tracing off


@dataclasses.dataclass(slots=True)
class JobTrace:
    """The spans of one job (see ``worker.tracing``)."""

    span: Span  # the CONSUMER span: delivery -> settled
    tracer: Tracer
    enqueued_ns: int = 0  # epoch ns when it was queued for a batch
    ended: bool = False


@dataclasses.dataclass(slots=True)
class Reply:
    """A reply body ready to publish for one job."""

    job: Job
    body: bytes
    content_type: str
    outcome_label: str  # "ok" or an error code, for metrics
