"""How a request becomes an AMQP message: properties and headers both producers (RPC and bulk) set.

Pure: builds :class:`aio_pika.Message` objects, sends nothing.
"""

from __future__ import annotations

import time

import aio_pika

from producer.wire.names import HEADER_DEADLINE_MS, HEADER_KIND, HEADER_PUBLISHED_MS, KIND_METADATA

__all__ = ["metadata_message", "now_ms", "request_message"]


def now_ms() -> int:
    """Milliseconds since the Unix epoch (the clock the deadline headers use)."""
    return time.time_ns() // 1_000_000


def request_message(
    body: bytes,
    *,
    request_id: str,
    content_type: str,
    reply_to: str,
    timeout_s: float | None = None,
    persistent: bool = False,
) -> aio_pika.Message:
    """An inference request message.

    Args:
        body: the encoded request (see :func:`producer.wire.protocol.encode_request`).
        request_id: becomes the ``correlation_id``; the reply carries it back.
        content_type: ``application/msgpack`` or ``application/json``.
        reply_to: direct reply-to for RPC, or a durable results queue for bulk jobs.
        timeout_s: when set, the request expires after this many seconds: the broker drops
            it (AMQP ``expiration``) and a worker that receives it later skips it
            (absolute ``x-deadline-ms`` header). ``None``: no deadline.
        persistent: delivery mode 2 (survives a broker restart); bulk jobs want it.
    """
    published_ms = now_ms()
    headers: dict[str, int] = {HEADER_PUBLISHED_MS: published_ms}
    expiration_ms: int | None = None
    if timeout_s is not None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        expiration_ms = max(1, round(timeout_s * 1000))
        headers[HEADER_DEADLINE_MS] = published_ms + expiration_ms
    return aio_pika.Message(
        body,
        content_type=content_type,
        correlation_id=request_id,
        reply_to=reply_to,
        headers=headers,  # type: ignore[arg-type]
        # aio-pika truncates seconds * 1000 to an int; the half millisecond keeps the exact value.
        expiration=None if expiration_ms is None else (expiration_ms + 0.5) / 1000,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
    )


def metadata_message(request_id: str, *, content_type: str, reply_to: str, timeout_s: float) -> aio_pika.Message:
    """A model metadata request (see :mod:`producer.wire.metadata`): empty body, ``x-qinfer-kind: metadata``.

    Args:
        request_id: the correlation id the reply carries back.
        content_type: the encoding wanted for the reply (``application/msgpack`` or ``application/json``).
        reply_to: where the reply goes (direct reply-to for RPC).
        timeout_s: the request's deadline, as for an inference request.
    """
    message = request_message(
        b"", request_id=request_id, content_type=content_type, reply_to=reply_to, timeout_s=timeout_s
    )
    message.headers[HEADER_KIND] = KIND_METADATA
    return message
