"""The library's logging: the standard ``logging`` module under ``qinfer.*`` names, silent by default.

The client, bulk, route and TLS code log events through :func:`get_logger`. An event is one name
plus key/values, as everywhere in qinfer; here it is a plain :class:`logging.LogRecord` whose message
reads ``event key=value ...`` and which carries the name and the fields as attributes
(``qinfer_event``, ``qinfer_fields``). The ``qinfer`` logger has a :class:`logging.NullHandler`, so an
application that configures nothing sees nothing (not even warnings through ``logging.lastResort``);
one that calls :func:`logging.basicConfig` or attaches a handler to ``qinfer`` gets them all.

Processes that own their output (the ``producer`` and ``worker`` CLIs) render these records with
structlog as key/values: :func:`add_library_fields` lifts the event and fields back out of a record
(``worker.logs`` puts it in its chain), and :func:`configure_cli` sets up the producer CLI's stderr.

Called by the producer's library modules (loggers) and by both CLIs (set-up).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

__all__ = ["ROOT_LOGGER", "EventLogger", "add_library_fields", "configure_cli", "get_logger"]

ROOT_LOGGER = "qinfer"
"""Parent of every library logger (``qinfer.client``, ``qinfer.bulk``, ``qinfer.routes``, ``qinfer.tls``...)."""

logging.getLogger(ROOT_LOGGER).addHandler(logging.NullHandler())

# Libraries whose own warnings repeat what qinfer says in its words (e.g. every returned message, with its body).
_CHATTY = ("aio_pika", "aiormq")


class EventLogger:
    """Logs events (a name plus key/values) to one standard library logger.

    Args:
        logger: the :class:`logging.Logger` records go to.
    """

    __slots__ = ("logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if not self.logger.isEnabledFor(level):
            return  # nothing is formatted for a disabled level
        exc_info = fields.pop("exc_info", None)  # an exception's traceback goes with the record, not in the message
        self.logger.log(
            level,
            "%s",
            format_event(event, fields),
            exc_info=exc_info,
            extra={"qinfer_event": event, "qinfer_fields": fields},
            stacklevel=3,
        )


def get_logger(name: str) -> EventLogger:
    """The event logger ``qinfer.<name>`` (e.g. ``get_logger("client")`` -> ``qinfer.client``)."""
    return EventLogger(logging.getLogger(f"{ROOT_LOGGER}.{name}"))


def format_event(event: str, fields: dict[str, Any]) -> str:
    """``event key=value ...`` as a plain handler prints it (a value with spaces or quotes in ``repr``)."""
    parts = [event]
    for key, value in fields.items():
        text = value if isinstance(value, str) else repr(value)
        if isinstance(value, str) and (not value or any(c in value for c in " \"'=\n")):
            text = repr(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def add_library_fields(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """structlog processor for foreign records: a library event's name and fields as the event and its keys."""
    record = event_dict.get("_record")
    event = getattr(record, "qinfer_event", None)
    if event is not None:
        event_dict["event"] = event
        for key, value in getattr(record, "qinfer_fields", {}).items():
            event_dict.setdefault(key, value)
    return event_dict


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler writing to whatever ``sys.stderr`` is when it emits (tests swap it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def configure_cli(level: int = logging.WARNING) -> None:
    """The producer CLI's logging: library events at ``level`` and above as key/values on stderr.

    Also quiets aio-pika's and aiormq's own loggers below CRITICAL: the CLI says in one line what went wrong.
    Leaves an already configured root logger (an embedding application, pytest's caplog) as it is,
    apart from adding this handler once.
    """
    if not structlog.is_configured():
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(level),
            logger_factory=lambda *_args: structlog.PrintLogger(sys.stderr),
        )
    qinfer = logging.getLogger(ROOT_LOGGER)
    if not any(isinstance(h, _CurrentStderr) for h in qinfer.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=[add_library_fields, structlog.processors.add_log_level],
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.dev.ConsoleRenderer(colors=False),
                ],
            )
        )
        qinfer.addHandler(handler)
    qinfer.setLevel(level)
    for name in _CHATTY:  # even their errors ("error when creating transport"): the CLI's one line says why
        logging.getLogger(name).setLevel(logging.CRITICAL)
