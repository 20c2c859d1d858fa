"""Trace context over AMQP, the publish span, and the OpenTelemetry SDK set up from ``OTEL_*`` variables.

W3C trace context (``traceparent``, ``tracestate``) travels in the AMQP message headers: the
producers (RPC client, bulk jobs, load generator) inject the context of a publish span (kind
PRODUCER, messaging semantic-convention attributes); the worker extracts it from any publisher
that sets the header and records its spans as children; replies carry the worker's context back.

Libraries here use the OpenTelemetry API only. Without an SDK tracer provider the API is a no-op:
a publish costs one no-op span and no header. :func:`configure_from_env` installs the SDK for a
process (the ``worker`` and ``producer`` commands call it): nothing is installed unless an exporter
is configured, so tracing stays off by default.

Shared by ``producer.client.rpc``, ``producer.bulk.job``, ``producer.loadtest.runner`` and the worker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

if TYPE_CHECKING:
    import aio_pika
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler

__all__ = [
    "TRACER_NAME",
    "ConfigError",
    "RoundTrips",
    "configure_from_env",
    "extract_context",
    "inject_context",
    "shutdown",
    "start_publish",
    "tracer",
]

TRACER_NAME = "qinfer"

# Messaging semantic conventions (https://opentelemetry.io/docs/specs/semconv/messaging/rabbitmq/).
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_DESTINATION_NAME = "messaging.destination.name"
MESSAGING_DESTINATION_TEMPORARY = "messaging.destination.temporary"
MESSAGING_ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
MESSAGING_DELIVERY_TAG = "messaging.rabbitmq.message.delivery_tag"
MESSAGING_MESSAGE_ID = "messaging.message.id"
MESSAGING_CONVERSATION_ID = "messaging.message.conversation_id"
MESSAGING_BODY_SIZE = "messaging.message.body.size"
MESSAGING_BATCH_COUNT = "messaging.batch.message_count"
ERROR_TYPE = "error.type"
RABBITMQ = "rabbitmq"

TRACEPARENT = "traceparent"
"""The W3C header that carries a span context; a message without it starts a new trace."""

MAX_ID_CHARS = 200  # longest request id copied into an attribute


class ConfigError(ValueError):
    """Raised when an ``OTEL_*`` variable names an exporter, protocol or sampler this service cannot use."""


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """Reads propagation fields from AMQP headers, whatever string type the publisher used."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, str):
            return [value]
        if isinstance(value, bytes | bytearray):
            return [bytes(value).decode("latin-1")]
        return None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


_GETTER = _HeaderGetter()


def tracer(provider: trace.TracerProvider | None = None) -> trace.Tracer:
    """The tracer of this project, from ``provider`` or the global tracer provider."""
    return trace.get_tracer(TRACER_NAME, tracer_provider=provider)


def extract_context(headers: Mapping[str, Any] | None) -> Context | None:
    """The trace context a message's headers carry, or None when they carry no ``traceparent``."""
    if not headers or TRACEPARENT not in headers:
        return None
    return propagate.extract(headers, getter=_GETTER)


def inject_context(headers: MutableMapping[str, Any], span: Span) -> None:
    """Write ``span``'s context into ``headers`` (``traceparent``, ``tracestate``); nothing for an invalid span."""
    if span.get_span_context().is_valid:
        propagate.inject(headers, context=trace.set_span_in_context(span))


def start_publish(
    publisher: trace.Tracer, message: aio_pika.Message, queue: str, *, context: Context | None = None
) -> Span:
    """Start the PRODUCER span of publishing ``message`` to ``queue`` and put its context in the headers.

    The span's parent is ``context`` (default: the current context). The caller ends the span: at
    the broker's confirm (bulk jobs), or when the reply arrives (RPC calls, the load generator).
    """
    span = publisher.start_span(f"publish {queue}", context=context, kind=SpanKind.PRODUCER)
    if span.is_recording():
        span.set_attributes(
            {
                MESSAGING_SYSTEM: RABBITMQ,
                MESSAGING_OPERATION_TYPE: "send",
                MESSAGING_OPERATION_NAME: "publish",
                MESSAGING_DESTINATION_NAME: queue,
                MESSAGING_ROUTING_KEY: queue,
                MESSAGING_CONVERSATION_ID: (message.correlation_id or "")[:MAX_ID_CHARS],
                MESSAGING_BODY_SIZE: len(message.body),
            }
        )
    if message.headers is None:
        message.headers = {}
    inject_context(message.headers, span)
    return span


def end_with_error(span: Span, error_type: str, description: str) -> None:
    """Mark ``span`` failed with ``error_type`` (an error code or exception class name) and end it."""
    if span.is_recording():
        span.set_attribute(ERROR_TYPE, error_type)
        span.set_status(Status(StatusCode.ERROR, description[:MAX_ID_CHARS]))
    span.end()


class RoundTrips:
    """The open publish spans of request/reply calls, by correlation id.

    A span starts at the publish, is linked to the context the reply carries back when it arrives,
    and ends when the caller has the reply (or gave up). With tracing off nothing is kept.

    Args:
        provider: the tracer provider (default: the global one).
    """

    def __init__(self, provider: trace.TracerProvider | None = None) -> None:
        self._tracer = tracer(provider)
        self._open: dict[str, Span] = {}

    def start(self, message: aio_pika.Message, queue: str) -> None:
        """Start the span of the call that publishes ``message`` (keyed by its correlation id)."""
        span = start_publish(self._tracer, message, queue)
        if span.is_recording() and message.correlation_id:
            self._open[message.correlation_id] = span

    def reply_arrived(self, correlation_id: str | None, headers: Mapping[str, Any] | None) -> None:
        """Link the call's span to the reply's context (the worker's reply publish)."""
        if not self._open or not correlation_id:
            return
        span = self._open.get(correlation_id)
        context = extract_context(headers)
        if span is not None and context is not None:
            reply_span = trace.get_current_span(context).get_span_context()
            if reply_span.is_valid:
                span.add_link(reply_span, {"qinfer.link": "reply"})

    def end(self, correlation_id: str, error: BaseException | None = None, *, code: str | None = None) -> None:
        """End the call's span: ``error`` (or an error reply's ``code``) marks it failed."""
        if not self._open:
            return
        span = self._open.pop(correlation_id, None)
        if span is None:
            return
        if code is not None:
            end_with_error(span, code, f"error reply: {code}")
        elif error is not None:
            end_with_error(span, type(error).__name__, str(error) or type(error).__name__)
        else:
            span.end()


def link_to(spans: Sequence[Span], attributes: Mapping[str, Any] | None = None) -> list[Link]:
    """Links to each valid span's context (a model run links to every request it carried)."""
    return [Link(s.get_span_context(), attributes) for s in spans if s.get_span_context().is_valid]


# ------------------------------------------------------------------------------------------------
# SDK set-up from the standard environment variables

_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
_EXPORTERS = ("otlp", "console", "none")
_PROTOCOLS = ("http/protobuf", "grpc")


def _env(env: Mapping[str, str], *names: str) -> str:
    """The first of ``names`` set (non-empty) in ``env``, stripped; empty when none is."""
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return ""


def tracing_requested(env: Mapping[str, str] | None = None) -> bool:
    """True when the environment configures a trace exporter (and does not disable the SDK).

    ``OTEL_TRACES_EXPORTER`` other than ``none``, or an OTLP endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT``
    or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) with no exporter named. Unlike the SDK's own default
    (``otlp``), nothing configured means no tracing: a worker must not try to reach a collector
    nobody asked for.
    """
    env = os.environ if env is None else env
    if _env(env, "OTEL_SDK_DISABLED").lower() == "true":
        return False
    exporters = _env(env, "OTEL_TRACES_EXPORTER")
    if exporters:
        return any(e.strip() not in ("", "none") for e in exporters.split(","))
    return bool(_env(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"))


def sampler_from_env(env: Mapping[str, str] | None = None) -> Sampler:
    """The sampler ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` name (default parentbased_always_on).

    Raises:
        ConfigError: an unknown sampler, or a ratio that is not a number between 0 and 1.
    """
    from opentelemetry.sdk.trace import sampling

    env = os.environ if env is None else env
    name = _env(env, "OTEL_TRACES_SAMPLER").lower() or "parentbased_always_on"
    if name not in _SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER is {name!r}; allowed: {', '.join(_SAMPLERS)}")
    ratio = 1.0
    if name.endswith("traceidratio"):
        text = _env(env, "OTEL_TRACES_SAMPLER_ARG") or "1.0"
        try:
            ratio = float(text)
        except ValueError:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG is {text!r}; it must be a ratio between 0 and 1") from None
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG is {ratio}; it must be between 0 and 1")
    root: Sampler = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(ratio),
    }[name.removeprefix("parentbased_")]
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


def _exporters(env: Mapping[str, str]) -> list[SpanExporter]:
    names = [e.strip().lower() for e in (_env(env, "OTEL_TRACES_EXPORTER") or "otlp").split(",") if e.strip()]
    exporters: list[SpanExporter] = []
    for name in names:
        if name not in _EXPORTERS:
            raise ConfigError(f"OTEL_TRACES_EXPORTER names {name!r}; allowed: {', '.join(_EXPORTERS)}")
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            protocol = _env(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
            if protocol not in _PROTOCOLS:
                raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL is {protocol!r}; allowed: {', '.join(_PROTOCOLS)}")
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

                exporters.append(GrpcExporter())
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

                exporters.append(HttpExporter())
    return exporters


def configure_from_env(
    service_name: str, *, env: Mapping[str, str] | None = None, wrap_sampler: Any = None
) -> SdkTracerProvider | None:
    """Install the OpenTelemetry SDK as the global tracer provider when the environment asks for tracing.

    Reads the standard variables: ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``),
    ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` / ``_PROTOCOL`` (``http/protobuf`` or ``grpc``) /
    ``_HEADERS`` / ``_TIMEOUT``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_TRACES_SAMPLER`` / ``_ARG``, ``OTEL_BSP_*`` (the batch span processor), ``OTEL_SDK_DISABLED``.

    Args:
        service_name: ``service.name`` when neither ``OTEL_SERVICE_NAME`` nor the resource attributes set one.
        env: the environment (default ``os.environ``); the exporters themselves read ``os.environ``.
        wrap_sampler: called with the configured sampler, returns the sampler to use (the worker's
            model-run spans follow the requests they link to).

    Returns:
        The installed provider (pass it to :func:`shutdown` at exit), or None when tracing is off.

    Raises:
        ConfigError: an ``OTEL_*`` variable this service cannot honour.
    """
    env = os.environ if env is None else env
    if not tracing_requested(env):
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    sampler = sampler_from_env(env)
    if wrap_sampler is not None:
        sampler = wrap_sampler(sampler)
    provider = TracerProvider(resource=resource, sampler=sampler)
    for exporter in _exporters(env):
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def shutdown(provider: SdkTracerProvider | None) -> None:
    """Export what is buffered and stop the exporters (no-op for None)."""
    if provider is not None:
        provider.shutdown()
