"""The RPC client: publish an inference request, await its reply over direct reply-to.

One connection and one channel carry everything: publishes (with publisher confirms, ``mandatory``
so an unroutable request raises) and the consumer on ``amq.rabbitmq.reply-to`` (direct reply-to
requires the reply consumer and the publishes to share a channel). Any number of concurrent
calls share them; a reply finds its caller by ``correlation_id``.

Example::

    import numpy as np
    from producer import Client

    async with Client("amqp://guest:guest@localhost/", queue="inference") as client:
        reply = await client.infer({"x": np.ones((2, 4), np.float32)}, timeout_s=5)
        print(reply.outputs["y"])
        reply = await client.infer_text(["hello world"], timeout_s=5)
        print(reply.outputs["embedding"].shape)  # (1, 384)

:class:`SyncClient` offers the same calls to plain synchronous scripts.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import numpy as np
import numpy.typing as npt
import structlog

from producer.errors import (
    ConnectionLostError,
    ErrorReplyError,
    ProtocolError,
    PublishRefusedError,
    RequestTimeoutError,
)
from producer.messages import request_message
from producer.names import CONTENT_TYPE_MSGPACK, DEFAULT_AMQP_URL, DEFAULT_QUEUE, DIRECT_REPLY_TO
from producer.protocol import ErrorReply, InferReply, decode_reply, encode_request
from producer.tls import TlsOptions
from producer.tls import connect as tls_connect
from producer.urls import connect_failure

__all__ = ["Client", "SyncClient"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 30.0
TEXT_INPUT = "text"


class Client:
    """Async inference client over one broker connection.

    Args:
        amqp_url: RabbitMQ URL, credentials included.
        queue: request queue the workers consume (default ``inference``); each call may override it.
        timeout_s: default per-call timeout in seconds; it is also the request's deadline.
        content_type: request encoding, ``application/msgpack`` (default, fast) or ``application/json``.
        connect_timeout_s: how long to wait for the broker when connecting.
        tls: for an ``amqps://`` URL: CA bundle, client certificate and key, host name check (default: the
            system's CAs, host name verified; :meth:`producer.tls.TlsOptions.from_env` reads ``AMQP_CA_FILE``...).

    Use as ``async with Client(...) as client`` or call :meth:`connect` and :meth:`close`. When the
    connection drops, calls awaiting a reply raise :class:`~producer.errors.ConnectionLostError`;
    the next call connects again.
    """

    def __init__(
        self,
        amqp_url: str = DEFAULT_AMQP_URL,
        *,
        queue: str = DEFAULT_QUEUE,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        content_type: str = CONTENT_TYPE_MSGPACK,
        connect_timeout_s: float = 10.0,
        tls: TlsOptions | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.amqp_url = amqp_url
        self.queue = queue
        self.timeout_s = timeout_s
        self.content_type = content_type
        self.connect_timeout_s = connect_timeout_s
        self.tls = tls
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._pending: dict[str, asyncio.Future[InferReply | ErrorReply]] = {}
        self._connect_lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def is_connected(self) -> bool:
        """True while the connection and its channel are open."""
        return self._channel is not None and not self._channel.is_closed

    async def connect(self) -> None:
        """Open the connection, the channel and the direct reply-to consumer (no-op when open).

        Raises:
            ConnectionLostError: when the broker cannot be reached within ``connect_timeout_s``.
        """
        async with self._connect_lock:
            if self.is_connected:
                return
            await self._close_connection()
            try:
                connection = await tls_connect(self.amqp_url, self.tls, timeout=self.connect_timeout_s)
            except (*aio_pika.exceptions.CONNECTION_EXCEPTIONS, TimeoutError) as e:
                raise ConnectionLostError(connect_failure(self.amqp_url, e)) from e
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                reply_queue = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
                await reply_queue.consume(self._on_reply, no_ack=True)
            except BaseException:
                await connection.close()
                raise
            connection.close_callbacks.add(self._on_closed)
            channel.close_callbacks.add(self._on_closed)
            self._connection, self._channel = connection, channel
            log.debug("client_connected", queue=self.queue)

    async def close(self) -> None:
        """Close the connection; calls still awaiting a reply raise ConnectionLostError."""
        async with self._connect_lock:
            await self._close_connection()

    async def _close_connection(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._fail_pending(ConnectionLostError("the client was closed"))
        if connection is not None and not connection.is_closed:
            await connection.close()

    def _on_closed(self, _sender: object, exc: BaseException | None) -> None:
        self._fail_pending(ConnectionLostError(f"the broker connection closed: {exc or 'closed'}"))

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is None or future.done():
            log.debug("client_late_reply", request_id=message.correlation_id)
            return
        try:
            future.set_result(decode_reply(message.body, message.content_type))
        except ProtocolError as e:
            future.set_exception(e)

    async def infer(
        self,
        inputs: Mapping[str, npt.ArrayLike | Sequence[str]],
        *,
        timeout_s: float | None = None,
        outputs: Sequence[str] | None = None,
        parameters: dict[str, Any] | None = None,
        request_id: str | None = None,
        queue: str | None = None,
    ) -> InferReply:
        """Send one request and return its reply.

        Args:
            inputs: input name to array (first dimension = rows); a list of strings is a BYTES tensor.
            timeout_s: seconds to wait for the reply (default: the client's ``timeout_s``); the
                request expires at the same moment, so a late request is never computed.
            outputs: output names to return (default: all).
            parameters: OIP request parameters passed to the worker.
            request_id: the request id (default: a random UUID); it is the message's correlation id.
            queue: request queue (default: the client's ``queue``).

        Raises:
            RequestTimeoutError: no reply within ``timeout_s``.
            ErrorReplyError: the worker answered with an error; ``.code`` says which.
            PublishRefusedError: the broker refused the request or has no such queue.
            ConnectionLostError: the connection dropped before the reply arrived.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        request_id = request_id or uuid.uuid4().hex
        body = encode_request(inputs, self.content_type, request_id=request_id, outputs=outputs, parameters=parameters)
        message = request_message(
            body, request_id=request_id, content_type=self.content_type, reply_to=DIRECT_REPLY_TO, timeout_s=timeout_s
        )
        routing_key = queue or self.queue
        if request_id in self._pending:
            raise ValueError(f"request id {request_id!r} is already awaiting a reply")
        future: asyncio.Future[InferReply | ErrorReply] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                if not self.is_connected:
                    await self.connect()
                assert self._channel is not None
                self._pending[request_id] = future
                await self._publish(self._channel, message, routing_key)
                reply = await future
        except TimeoutError:
            raise RequestTimeoutError(
                f"no reply to request {request_id!r} from queue {routing_key!r} within {timeout_s:g} s"
            ) from None
        finally:
            if self._pending.get(request_id) is future:
                del self._pending[request_id]
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: a publish error may have been raised instead
        if isinstance(reply, ErrorReply):
            raise ErrorReplyError(reply.id or request_id, reply.code, reply.message)
        return reply

    async def infer_text(
        self,
        texts: Sequence[str],
        *,
        input_name: str = TEXT_INPUT,
        timeout_s: float | None = None,
        outputs: Sequence[str] | None = None,
        request_id: str | None = None,
        queue: str | None = None,
    ) -> InferReply:
        """Send strings (one row each) to a text model; the default model answers ``embedding`` [rows, 384].

        Args:
            texts: one string per row.
            input_name: the text input's name (``text``).
            timeout_s, outputs, request_id, queue: as for :meth:`infer`.
        """
        array = np.empty(len(texts), dtype=object)
        array[:] = list(texts)
        return await self.infer(
            {input_name: array}, timeout_s=timeout_s, outputs=outputs, request_id=request_id, queue=queue
        )

    @staticmethod
    async def _publish(channel: aio_pika.abc.AbstractChannel, message: aio_pika.Message, queue: str) -> None:
        try:
            await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)
        except aio_pika.exceptions.PublishError as e:
            raise PublishRefusedError(f"the broker could not route the request: no queue named {queue!r}") from e
        except aio_pika.exceptions.DeliveryError as e:
            raise PublishRefusedError(f"the broker refused the request to queue {queue!r} (nack)") from e
        except (aio_pika.exceptions.AMQPConnectionError, aio_pika.exceptions.ChannelInvalidStateError) as e:
            raise ConnectionLostError(f"the broker connection closed while publishing: {e}") from e


class SyncClient:
    """Blocking twin of :class:`Client` for scripts; runs the async client on a private thread.

    Takes the same arguments as :class:`Client` and connects at once. Use as a context manager or
    call :meth:`close`::

        with SyncClient(queue="inference") as client:
            reply = client.infer({"x": np.ones((1, 4), np.float32)}, timeout_s=5)
    """

    def __init__(self, amqp_url: str = DEFAULT_AMQP_URL, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qinfer-client", daemon=True)
        self._thread.start()
        self._client = Client(amqp_url, **kwargs)
        try:
            self._run(self._client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def infer(self, inputs: Mapping[str, npt.ArrayLike | Sequence[str]], **kwargs: Any) -> InferReply:
        """Blocking :meth:`Client.infer` (same arguments and exceptions)."""
        return self._run(self._client.infer(inputs, **kwargs))

    def infer_text(self, texts: Sequence[str], **kwargs: Any) -> InferReply:
        """Blocking :meth:`Client.infer_text` (same arguments and exceptions)."""
        return self._run(self._client.infer_text(texts, **kwargs))

    def close(self) -> None:
        """Close the connection and stop the client's thread (idempotent)."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
