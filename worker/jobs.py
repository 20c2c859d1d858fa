"""The records that travel through the worker: one :class:`Job` per delivery, split into pieces
(:class:`Piece`) for batches, and one :class:`Reply` per answer.

Data only. Created by ``worker.intake``; split into pieces and batched by ``worker.scheduler``;
answered by ``worker.answering``; settled by ``worker.settler``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from opentelemetry.trace import Span, Tracer

from producer.wire.protocol import InferRequest
from worker.acks import AckLedger
from worker.assembly import Assembly
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
    assembly: Assembly | None = None  # its pieces' outputs, once the scheduler has split it
    pieces_waiting: int = 0  # its pieces still waiting for a batch


@dataclasses.dataclass(slots=True)
class JobTrace:
    """The spans of one job (see ``worker.tracing``)."""

    span: Span  # the CONSUMER span: delivery -> settled
    tracer: Tracer
    enqueued_ns: int = 0  # epoch ns when it was queued for a batch
    ended: bool = False


@dataclasses.dataclass(slots=True)
class Piece:
    """Consecutive rows of one job, batched as one item (a whole request is a piece of itself)."""

    job: Job
    first_row: int
    rows: int
    part: Any  # what the pipeline runs for these rows (see Pipeline.pieces)


@dataclasses.dataclass(slots=True)
class Reply:
    """A reply body ready to publish for one job."""

    job: Job
    body: bytes
    content_type: str
    outcome_label: str  # "ok" or an error code, for metrics
