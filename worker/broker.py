"""Broker connections and the request queue's declaration, shared by the worker's I/O."""

from __future__ import annotations

import aiormq.exceptions
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue, AbstractRobustConnection
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_delay,
    wait_exponential,
)

from producer.amqp import tls
from producer.amqp.routes import RouteError, declare_route, set_weight
from producer.amqp.urls import connect_failure
from producer.wire.errors import BrokerTlsError
from producer.wire.names import dead_letter_queue, request_queue_arguments
from worker.errors import BrokerAuthenticationError, BrokerRouteError, BrokerUnavailableError
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
    """Declare the request queue and its dead-letter queue, both durable, from the shared arguments.

    A routed worker (``traffic_weight`` set) first declares its model's route, and after its version
    queue binds it to the route with its weight (:func:`join_route`).
    """
    if settings.routed:
        await check_route(settings)
    await channel.declare_queue(
        dead_letter_queue(settings.queue), durable=True, arguments={"x-queue-type": settings.queue_type}
    )
    queue = await channel.declare_queue(
        settings.queue,
        durable=True,
        arguments=request_queue_arguments(
            settings.queue, queue_type=settings.queue_type, delivery_limit=settings.delivery_limit
        ),
    )
    if settings.routed:
        await join_route(settings)
    return queue


async def _route_connection(settings: Settings) -> AbstractConnection:
    # Its own short, plain connection: a broker without the exchange type closes the whole connection,
    # which a robust connection would try to restore.
    return await tls.connect(
        settings.amqp_url,
        settings.tls,
        timeout=settings.connect_timeout_s,
        client_properties={"connection_name": "qinfer-worker-route"},
    )


async def check_route(settings: Settings) -> None:
    """Declare the model's route exchange; refuse to start when the broker cannot provide it.

    Raises:
        BrokerRouteError: the consistent-hash exchange is missing (plugin not enabled) or the name clashes.
    """
    connection = await _route_connection(settings)
    try:
        await declare_route(await connection.channel(), settings.model_name)
    except RouteError as e:
        raise BrokerRouteError(str(e)) from e
    finally:
        await connection.close()


async def join_route(settings: Settings) -> None:
    """Bind this version's queue to its model's route with ``traffic_weight`` (0: unbind), replacing any other."""
    assert settings.traffic_weight is not None
    connection = await _route_connection(settings)
    try:
        await set_weight(
            await connection.channel(), settings.model_name, settings.model_version, settings.traffic_weight
        )
    except RouteError as e:
        raise BrokerRouteError(str(e)) from e
    finally:
        await connection.close()
    log.info(
        "route_joined",
        model=settings.model_name,
        version=settings.model_version,
        queue=settings.queue,
        traffic_weight=settings.traffic_weight,
    )
