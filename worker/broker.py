"""Broker connections and the request queue's declaration, shared by the worker's I/O."""

from __future__ import annotations

import aiormq.exceptions
import structlog
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_delay,
    wait_exponential,
)

from producer import tls
from producer.errors import BrokerTlsError
from producer.names import dead_letter_queue, request_queue_arguments
from producer.urls import connect_failure
from worker.errors import BrokerAuthenticationError, BrokerUnavailableError
from worker.settings import Settings

log = structlog.get_logger("worker")

# Credentials the broker rejected: retrying cannot fix them.
_REJECTED = (aiormq.exceptions.ProbableAuthenticationError, aiormq.exceptions.AuthenticationError)


async def connect(
    url: str, *, timeout_s: float, name: str, tls_options: tls.TlsOptions | None = None
) -> AbstractRobustConnection:
    """A robust connection, retried with backoff for up to ``timeout_s`` at start.

    ``tls_options`` apply to an ``amqps://`` URL (default: the system's CAs, host name verified).

    Raises:
        BrokerAuthenticationError: at once, when the broker rejects the credentials.
        BrokerTlsError: at once, when the TLS files cannot be used or the handshake fails.
        BrokerUnavailableError: when the broker did not answer in time.
    """
    retrying = AsyncRetrying(
        stop=stop_after_delay(timeout_s),
        wait=wait_exponential(multiplier=0.25, max=5),
        retry=retry_if_exception_type((ConnectionError, OSError, aiormq.exceptions.AMQPConnectionError))
        & retry_if_not_exception_type((*_REJECTED, BrokerTlsError)),
        reraise=True,
        before_sleep=lambda state: log.warning(
            "broker_unreachable",
            attempt=state.attempt_number,
            error=str(state.outcome.exception() if state.outcome else None),
        ),
    )
    try:
        async for attempt in retrying:
            with attempt:
                return await tls.connect_robust(url, tls_options, client_properties={"connection_name": name})
    except _REJECTED as e:
        raise BrokerAuthenticationError(connect_failure(url, e)) from e
    except (ConnectionError, OSError, aiormq.exceptions.AMQPConnectionError) as e:
        raise BrokerUnavailableError(
            f"{connect_failure(url, e)}; tried for {timeout_s:g} s (WORKER_CONNECT_TIMEOUT_S)"
        ) from e
    raise AssertionError("unreachable")  # pragma: no cover


async def declare_request_queue(channel: AbstractChannel, settings: Settings) -> AbstractQueue:
    """Declare the request queue and its dead-letter queue, both durable, from the shared arguments."""
    await channel.declare_queue(
        dead_letter_queue(settings.queue), durable=True, arguments={"x-queue-type": settings.queue_type}
    )
    return await channel.declare_queue(
        settings.queue,
        durable=True,
        arguments=request_queue_arguments(
            settings.queue, queue_type=settings.queue_type, delivery_limit=settings.delivery_limit
        ),
    )
