"""The worker's spans: one per request (kind CONSUMER), its steps, and one per model run linked to its requests.

For each delivery the worker extracts the W3C trace context from the message headers (any
publisher's, see :mod:`producer.amqp.tracing`) and records, as children of it::

    process <queue>          CONSUMER  delivery -> settled; time in the broker, outcome, error status
      decode                 INTERNAL  decode and validate (tokenize) the request
      batch wait             INTERNAL  queued for a batch -> start of its model run
      publish reply          PRODUCER  the reply publish (its context travels back in the reply headers)
    run <model>              INTERNAL  one model run: rows, requests, compute time, device; a link
                                       to the process span of every sampled request it carried

A request that is not sampled keeps its (non-recording) process span, whose context its log lines
and its reply carry, and gets no step spans.

Error replies and deadline skips set the request span's status to ERROR. A job carries its
:class:`JobTrace` (``Job.trace``); with tracing off (no SDK tracer provider) it stays None and every
hook returns at its first line.

Called by intake (receive, decode), the scheduler (model runs), the replies (reply publish, errors)
and the settler (end of a request); calls the OpenTelemetry API and :mod:`producer.amqp.tracing`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import sampling
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes

from producer.amqp import tracing as wire
from producer.wire.names import DIRECT_REPLY_TO
from worker.jobs import Job, JobTrace

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Link

__all__ = [
    "ConfigError",
    "LinkedSampler",
    "WorkerTracing",
    "configure_from_env",
    "job_context",
    "log_ids",
    "shutdown",
]

ConfigError = wire.ConfigError
shutdown = wire.shutdown

_NO_CONTEXT = contextlib.nullcontext()
_NO_HEADERS: contextlib.nullcontext[None] = contextlib.nullcontext(None)


def _ns(monotonic_s: float) -> int:
    """A ``time.monotonic()`` reading as epoch nanoseconds (span timestamps)."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


class WorkerTracing:
    """Starts the request spans of one worker.

    Args:
        queue: the request queue (the CONSUMER span's destination).
        provider: the tracer provider; default the global one. Tracing is on when a provider is
            given or the global one is an SDK provider (see :func:`producer.amqp.tracing.configure_from_env`).
    """

    def __init__(self, queue: str, provider: trace.TracerProvider | None = None) -> None:
        chosen = provider if provider is not None else trace.get_tracer_provider()
        self.enabled = not isinstance(chosen, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
        self._tracer = wire.tracer(chosen)
        self._queue = queue
        self._name = f"process {queue}"

    def receive(self, job: Job) -> None:
        """Start ``job``'s CONSUMER span, a child of the context its headers carry (if any)."""
        if not self.enabled:
            return
        message = job.message
        span = self._tracer.start_span(
            self._name, context=wire.extract_context(message.headers), kind=SpanKind.CONSUMER
        )
        job.trace = JobTrace(span, self._tracer)
        if span.is_recording():
            span.set_attributes(
                {
                    wire.MESSAGING_SYSTEM: wire.RABBITMQ,
                    wire.MESSAGING_OPERATION_TYPE: "process",
                    wire.MESSAGING_OPERATION_NAME: "process",
                    wire.MESSAGING_DESTINATION_NAME: self._queue,
                    wire.MESSAGING_DELIVERY_TAG: message.delivery_tag or 0,
                    wire.MESSAGING_CONVERSATION_ID: (message.correlation_id or "")[: wire.MAX_ID_CHARS],
                    wire.MESSAGING_BODY_SIZE: len(message.body),
                    "qinfer.redelivered": bool(message.redelivered),
                }
            )


def job_context(job: Job) -> contextlib.AbstractContextManager[Any]:
    """Make ``job``'s span the current one (log lines then carry its trace and span ids)."""
    t = job.trace
    if t is None:
        return _NO_CONTEXT
    return trace.use_span(t.span, end_on_exit=False, record_exception=False, set_status_on_exception=False)


def log_ids(job: Job) -> dict[str, str]:
    """``trace_id`` and ``span_id`` of ``job``'s span for a log line (empty with tracing off)."""
    t = job.trace
    if t is None:
        return {}
    ctx = t.span.get_span_context()
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


def decoding(job: Job) -> contextlib.AbstractContextManager[Any]:
    """The decode/validate step of ``job`` as a child span (current meanwhile); exceptions pass through.

    Steps of a request that is not sampled get no span: they would not be recorded either.
    """
    t = job.trace
    if t is None or not t.span.is_recording():
        return _NO_CONTEXT
    return _decoding(t)


@contextlib.contextmanager
def _decoding(t: JobTrace) -> Iterator[None]:
    parent = trace.set_span_in_context(t.span)
    span = t.tracer.start_span("decode", context=parent)
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield
    except Exception as e:
        if span.is_recording():
            span.set_status(Status(StatusCode.ERROR, type(e).__name__))
        raise
    finally:
        otel_context.detach(token)
        span.end()


def enqueued(job: Job) -> None:
    """Note when ``job`` was queued for a batch (the batch-wait span starts there)."""
    t = job.trace
    if t is not None:
        t.enqueued_ns = time.time_ns()


def model_run(jobs: Sequence[Job], *, started_s: float, compute_s: float, rows: int, model: str, device: str) -> None:
    """Record a finished model run: each request's batch-wait span, and one run span linked to them all.

    Args:
        jobs: the requests the run carried.
        started_s: when the run started (``time.monotonic()``).
        compute_s: how long it took.
        rows, model, device: the run's rows, the model's name, the ONNX Runtime provider it ran on.
    """
    recording = [j.trace for j in jobs if j.trace is not None and j.trace.span.is_recording()]
    if not recording:
        return
    start_ns = _ns(started_s)
    end_ns = start_ns + int(compute_s * 1e9)
    for t in recording:
        wait = t.tracer.start_span(
            "batch wait", context=trace.set_span_in_context(t.span), start_time=t.enqueued_ns or start_ns
        )
        wait.end(end_time=start_ns)
        t.span.set_attributes({"qinfer.compute_ms": round(compute_s * 1e3, 3), "qinfer.batch.rows": rows})
    attributes: Attributes = {
        "qinfer.model": model,
        "qinfer.device": device,
        "qinfer.batch.rows": rows,
        "qinfer.batch.requests": len(jobs),
        "qinfer.compute_ms": round(compute_s * 1e3, 3),
        wire.MESSAGING_BATCH_COUNT: len(jobs),
    }
    run = recording[0].tracer.start_span(
        f"run {model}",
        context=otel_context.Context(),  # a root: the requests are links, not parents
        links=wire.link_to([t.span for t in recording]),
        attributes=attributes,
        start_time=start_ns,
    )
    run.end(end_time=end_ns)


def publishing_reply(job: Job) -> contextlib.AbstractContextManager[dict[str, Any] | None]:
    """The reply publish as a PRODUCER child span; yields the reply headers carrying its context (None: off).

    A request that is not sampled gets no reply span; its reply carries the request span's context.
    """
    t = job.trace
    if t is None:
        return _NO_HEADERS
    if not t.span.is_recording():
        headers: dict[str, Any] = {}
        wire.inject_context(headers, t.span)
        return contextlib.nullcontext(headers)
    return _publishing_reply(t, job)


@contextlib.contextmanager
def _publishing_reply(t: JobTrace, job: Job) -> Iterator[dict[str, Any] | None]:
    to = job.reply_to
    direct = to is not None and to.address.startswith(DIRECT_REPLY_TO)
    span = t.tracer.start_span("publish reply", context=trace.set_span_in_context(t.span), kind=SpanKind.PRODUCER)
    if span.is_recording():
        span.set_attributes(
            {
                wire.MESSAGING_SYSTEM: wire.RABBITMQ,
                wire.MESSAGING_OPERATION_TYPE: "send",
                wire.MESSAGING_OPERATION_NAME: "publish",
                wire.MESSAGING_DESTINATION_NAME: DIRECT_REPLY_TO if direct or to is None else to.address,
                wire.MESSAGING_DESTINATION_TEMPORARY: direct,
            }
        )
    headers: dict[str, Any] = {}
    wire.inject_context(headers, span)
    try:
        yield headers
    finally:
        span.end()


def error_reply(job: Job, code: str) -> None:
    """Mark ``job``'s span failed: it is answered with error ``code`` (a deadline skip included)."""
    t = job.trace
    if t is not None and t.span.is_recording():
        t.span.set_attribute(wire.ERROR_TYPE, code)
        t.span.set_status(Status(StatusCode.ERROR, f"error reply: {code}"))


def end_job(job: Job, outcome: str, action: str) -> None:
    """End ``job``'s span once its delivery is settled: ``action`` (ack, requeue, dead_letter) for ``outcome``."""
    t = job.trace
    if t is None or t.ended:
        return
    t.ended = True
    span = t.span
    if span.is_recording():
        attributes: dict[str, Any] = {
            "qinfer.outcome": outcome,
            "qinfer.ack": action,
            wire.MESSAGING_MESSAGE_ID: job.request_id[: wire.MAX_ID_CHARS],
        }
        if job.broker_ms is not None:
            attributes["qinfer.broker_ms"] = round(job.broker_ms, 3)
        if job.request is not None:
            attributes["qinfer.rows"] = job.request.rows
        span.set_attributes(attributes)
        if outcome != "replied":
            span.set_status(Status(StatusCode.ERROR, f"not answered: {outcome} ({action})"))
    span.end()


def held(job: Job) -> None:
    """Note on ``job``'s span that the broker refused its reply and it is held for another try."""
    t = job.trace
    if t is not None and t.span.is_recording():
        t.span.add_event("reply refused: held for a retry", {"qinfer.reply_attempts": job.reply_attempts})


class LinkedSampler(sampling.Sampler):
    """The configured sampler, except that a root span linked to a sampled span is sampled too.

    A model run is a root span linked to the requests it carried: with a ratio sampler it is traced
    whenever one of its requests is, instead of at the ratio squared.

    Args:
        inner: the sampler from ``OTEL_TRACES_SAMPLER``.
    """

    def __init__(self, inner: sampling.Sampler) -> None:
        self._inner = inner

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> sampling.SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if not parent.is_valid and links and any(link.context.trace_flags.sampled for link in links):
            return sampling.SamplingResult(sampling.Decision.RECORD_AND_SAMPLE, attributes)
        return self._inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"LinkedSampler{{{self._inner.get_description()}}}"


def configure_from_env(env: Mapping[str, str] | None = None) -> Any:
    """Install the SDK from ``OTEL_*`` variables for a worker process (service name ``qinfer-worker``).

    Returns the provider to shut down at exit, or None when tracing is off.
    """
    return wire.configure_from_env("qinfer-worker", env=env, wrap_sampler=LinkedSampler)
