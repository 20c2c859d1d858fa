"""structlog set-up: JSON lines in containers, readable console output on a terminal.

The worker's own events (structlog) and the library's (``producer.amqp.logs``: standard ``logging`` under
``qinfer.*``, e.g. the route and TLS events) go through one renderer. Called by ``worker.cli``.
"""

from __future__ import annotations

import logging
import sys

import structlog
from opentelemetry import trace

from producer.amqp.logs import add_library_fields


def add_trace_ids(_logger: object, _method: str, event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """Add ``trace_id`` and ``span_id`` of the current span (a request being processed), when there is one."""
    if "trace_id" not in event_dict:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            event_dict["trace_id"] = format(ctx.trace_id, "032x")
            event_dict["span_id"] = format(ctx.span_id, "016x")
    return event_dict


def configure_logging(*, log_format: str = "auto", level: str = "info") -> None:
    """Route structlog and the standard library's logging through one renderer.

    Args:
        log_format: ``json``, ``console``, or ``auto`` (console on a TTY, else JSON).
        level: lowest level logged (``debug``, ``info``, ``warning``, ``error``).
    """
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[add_library_fields, *shared],  # the client/route/TLS events as key/values
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *([structlog.processors.format_exc_info] if use_json else []),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aio-pika/aiormq log every reconnect attempt and returned message; their summaries are ours.
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    transport = logging.getLogger("aiormq.connection")
    if not any(isinstance(f, _TransportErrorFilter) for f in transport.filters):
        transport.addFilter(_TransportErrorFilter())


class _TransportErrorFilter(logging.Filter):
    """Drops aiormq's line for a connection that could not be opened: the worker says why in its own words
    (``broker_unreachable``, ``worker_failed``), once, where aiormq would add one error line per attempt."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error when creating transport")
