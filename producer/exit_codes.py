"""Exit statuses of ``producer send`` and ``producer metadata``: one per class of outcome, so scripts can branch.

Pure: maps what a call raised to a status and a one-line reason for stderr. The README's exit code
table lists the same values. ``producer bulk`` keeps its own statuses (see ``producer.bulk.cli``).

Called by ``producer.cli``.
"""

from __future__ import annotations

import enum

import aio_pika.exceptions
import aiormq.exceptions

from producer.wire.errors import (
    BrokerTlsError,
    ConnectionLostError,
    ErrorReplyError,
    PublishRefusedError,
    RequestTimeoutError,
)

__all__ = ["ExitCode", "exit_code_for"]


class ExitCode(enum.IntEnum):
    """What a ``producer send`` / ``producer metadata`` run ended with."""

    OK = 0
    """A result reply (printed on stdout)."""
    ERROR_REPLY = 1
    """The worker answered with an error reply (printed on stdout; its code and message on stderr)."""
    USAGE = 2
    """Bad flags or settings (argparse's own status): nothing was sent."""
    TIMEOUT = 3
    """No reply within --timeout-s: no worker consumes the queue, or it is too busy."""
    UNROUTABLE = 4
    """The broker refused the request: no such queue or route (NO_ROUTE), a nack, or no version takes it."""
    CONNECTION = 5
    """The broker could not be reached, or refused the TLS handshake or the credentials."""
    INTERRUPTED = 130
    """Interrupted (Ctrl-C), as shells report SIGINT."""


def exit_code_for(error: BaseException) -> ExitCode:
    """The status for what a send raised (exceptions from :class:`producer.Client` or from aio-pika directly).

    Raises:
        TypeError: for an exception no class covers (a bug: the caller lets it propagate).
    """
    if isinstance(error, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(error, ErrorReplyError):
        return ExitCode.ERROR_REPLY
    if isinstance(error, RequestTimeoutError | TimeoutError):
        return ExitCode.TIMEOUT
    if isinstance(
        error, PublishRefusedError | aio_pika.exceptions.DeliveryError | aiormq.exceptions.ChannelNotFoundEntity
    ):
        return ExitCode.UNROUTABLE
    if isinstance(
        error, BrokerTlsError | ConnectionLostError | ConnectionError | OSError | aiormq.exceptions.AMQPConnectionError
    ):
        return ExitCode.CONNECTION
    raise TypeError(f"no exit status for {type(error).__name__}") from error
