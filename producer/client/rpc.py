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

    # A model served in versions: the broker splits requests across them by weight.
    async with Client(url, model="minilm") as client:
        reply = await client.infer_text(["hello"])               # any live version, by weight
        print(reply.model_version)                               # the version that answered
        reply = await client.infer_text(["hello"], version="2")  # pinned to version 2
        meta = await client.metadata(version="2")                # what version 2 takes (no model run)

:class:`SyncClient` offers the same calls to plain synchronous scripts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import uuid
from collections.abc import Hashable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import numpy as np
import numpy.typing as npt
from opentelemetry.trace import TracerProvider

from producer.amqp.logs import get_logger
from producer.amqp.messages import metadata_message, request_message
from producer.amqp.publish import Target, publish_request, resolve_target
from producer.amqp.tasks import TaskSet
from producer.amqp.tls import TlsOptions
from producer.amqp.tls import connect as tls_connect
from producer.amqp.tracing import RoundTrips
from producer.amqp.urls import connect_failure
from producer.client.coalesce import Coalescer, lane_key, split_rows
from producer.wire.errors import ConnectionLostError, ErrorReplyError, ProtocolError, RequestTimeoutError
from producer.wire.metadata import ModelMetadata, decode_metadata
from producer.wire.names import (
    CONTENT_TYPE_MSGPACK,
    DEFAULT_AMQP_URL,
    DEFAULT_MAX_BATCH,
    DEFAULT_QUEUE,
    DIRECT_REPLY_TO,
    check_route_name,
)
from producer.wire.protocol import ErrorCode, ErrorReply, InferReply, as_tensor, decode_reply, encode_request
from producer.wire.rows import concat_rows

__all__ = ["Client"]

log = get_logger("client")


DEFAULT_TIMEOUT_S = 30.0
DEFAULT_COALESCE_ROWS = DEFAULT_MAX_BATCH
TEXT_INPUT = "text"

# Error codes that depend only on what every call of a packed request shares (names, datatypes,
# shapes, outputs, deadline class): each caller gets the error as it is. Any other error of a packed
# request (a bad value in one row, too many rows for the worker) sends each call again on its own.
_SHARED_ERRORS = frozenset(
    {
        ErrorCode.UNSUPPORTED_CONTENT_TYPE,
        ErrorCode.UNKNOWN_INPUT,
        ErrorCode.MISSING_INPUT,
        ErrorCode.WRONG_DATATYPE,
        ErrorCode.WRONG_SHAPE,
        ErrorCode.UNKNOWN_OUTPUT,
        ErrorCode.DEADLINE_EXCEEDED,
    }
)


@dataclasses.dataclass(eq=False, slots=True)
class _Call:
    """One caller's request, from :meth:`Client.infer` until its reply (alone, or packed with others)."""

    inputs: Mapping[str, Any]  # tensors (as_tensor) when the call may be packed, else as the caller gave them
    rows: int
    request_id: str
    target: Target
    outputs: Sequence[str] | None
    parameters: dict[str, Any] | None
    deadline_s: float  # event-loop time
    future: asyncio.Future[InferReply | ErrorReply]
    packed_id: str | None = None  # the packed request carrying it, once sent in one


class Client:
    """Async inference client over one broker connection.

    Args:
        amqp_url: RabbitMQ URL, credentials included.
        queue: request queue the workers consume (default ``inference``); each call may override it.
        timeout_s: default per-call timeout in seconds; it is also the request's deadline.
        content_type: request encoding, ``application/msgpack`` (default, fast) or ``application/json``.
        connect_timeout_s: how long to wait for the broker when connecting.
        coalesce_rows: most rows in one packed request (default 64, the worker's default ``--max-batch``).
            Concurrent :meth:`infer` calls to the same queue with the same input names, datatypes,
            non-batch dimensions, outputs and timeout, and no ``parameters``, are packed into one
            multi-row request while an earlier one awaits the broker's confirm; a call never waits
            for company. Each caller still gets its own reply (its rows, the model version, the
            timing). ``1`` turns packing off.
        tracer_provider: where each call's span goes (default: the global OpenTelemetry provider; see
            :mod:`producer.amqp.tracing`).
        model: send to this model's route instead of ``queue``: the broker splits the requests across
            the model's live versions by weight, deterministically per request id, and each reply's
            ``model_version`` says which version answered. A call with an explicit ``request_id`` is
            never packed with others, so its own id picks the version (a retry lands where the first
            try did while the weights stay the same).
        version: pin every call to this version of ``model`` (each :meth:`infer` may pin its own).
        tls: for an ``amqps://`` URL: CA bundle, client certificate and key, host name check (default: the
            system's CAs, host name verified; :meth:`producer.amqp.tls.TlsOptions.from_env` reads ``AMQP_CA_FILE``...).

    Use as ``async with Client(...) as client`` or call :meth:`connect` and :meth:`close`. When the
    connection drops, calls awaiting a reply raise :class:`~producer.wire.errors.ConnectionLostError`;
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
        coalesce_rows: int = DEFAULT_COALESCE_ROWS,
        tracer_provider: TracerProvider | None = None,
        model: str | None = None,
        version: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        if model is not None:
            check_route_name("model name", model)
        if version is not None:
            if model is None:
                raise ValueError(f"version={version!r} pins a version of a model: pass model= too")
            check_route_name("model version", version)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if coalesce_rows < 1:
            raise ValueError(f"coalesce_rows must be at least 1 (1 turns packing off), got {coalesce_rows}")
        self.amqp_url = amqp_url
        self.queue = queue
        self.model = model
        self.version = version
        self.timeout_s = timeout_s
        self.content_type = content_type
        self.connect_timeout_s = connect_timeout_s
        self.tls = tls
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._pending: dict[str, asyncio.Future[InferReply | ErrorReply]] = {}
        self._metadata_pending: dict[str, asyncio.Future[bytes]] = {}  # raw bodies: decoded by metadata()
        self._connect_lock = asyncio.Lock()
        self.coalesce_rows = coalesce_rows
        self._coalescer: Coalescer[_Call] = Coalescer(
            coalesce_rows, self._send_calls, rows_of=lambda c: c.rows, wanted=lambda c: not c.future.done()
        )
        self._calls: dict[str, _Call] = {}
        self._tasks = TaskSet()
        self._traces = RoundTrips(tracer_provider)

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
        for call in await self._coalescer.close():
            if not call.future.done():
                call.future.set_exception(ConnectionLostError("the client was closed"))
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
        metadata, self._metadata_pending = self._metadata_pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
        for asked in metadata.values():
            if not asked.done():
                asked.set_exception(error)

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self._traces.reply_arrived(message.correlation_id, message.headers)
        asked = self._metadata_pending.pop(message.correlation_id or "", None)
        if asked is not None:
            if not asked.done():
                asked.set_result(message.body)
            return
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
        version: str | None = None,
    ) -> InferReply:
        """Send one request and return its reply.

        Args:
            inputs: input name to array (first dimension = rows); a list of strings is a BYTES tensor.
            timeout_s: seconds to wait for the reply (default: the client's ``timeout_s``); the
                request expires at the same moment, so a late request is never computed.
            outputs: output names to return (default: all).
            parameters: OIP request parameters passed to the worker.
            request_id: the request id (default: a random UUID); it is the message's correlation id.
            queue: request queue (default: the client's ``queue``; not used with a ``model``).
            version: pin this call to a version of the client's ``model`` (default: the client's ``version``).

        Raises:
            RequestTimeoutError: no reply within ``timeout_s``.
            ErrorReplyError: the worker answered with an error; ``.code`` says which.
            PublishRefusedError: the broker refused the request or has no such queue, version or live route.
            ConnectionLostError: the connection dropped before the reply arrived.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        target = self._target(queue, version)
        own_id_picks_version = bool(target.exchange) and request_id is not None
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._calls:
            raise ValueError(f"request id {request_id!r} is already awaiting a reply")
        # A call goes in a lane its shape shares with others, or alone in a lane of its own: with parameters,
        # with its own id picking the version, with inputs that cannot be packed, or when packing is off.
        lane: Hashable = object()
        payload: Mapping[str, Any] = inputs
        rows = 1
        if self.coalesce_rows > 1 and parameters is None and not own_id_picks_version:
            payload = arrays = {name: as_tensor(value) for name, value in inputs.items()}
            key = lane_key(arrays)
            if key is not None:
                lane = (target, timeout_s, tuple(outputs) if outputs else None, key)
                rows = int(next(iter(arrays.values())).shape[0])
        loop = asyncio.get_running_loop()
        call = _Call(
            payload, rows, request_id, target, outputs, parameters, loop.time() + timeout_s, loop.create_future()
        )
        self._calls[request_id] = call
        self._coalescer.submit(lane, call)
        error: BaseException | None = None
        try:
            async with asyncio.timeout(timeout_s):
                reply = await call.future
        except TimeoutError:
            error = RequestTimeoutError(
                f"no reply to request {request_id!r} from {target.where} within {timeout_s:g} s"
            )
            raise error from None
        except BaseException as e:
            error = e
            raise
        finally:
            del self._calls[request_id]
            if call.packed_id is None:  # sent alone: its span ends with the call (a packed one's with the pack)
                done = call.future.done() and not call.future.cancelled()
                self._traces.end(request_id, error, code=_error_code(call.future) if done and not error else None)
            self._forget(call)
        if isinstance(reply, ErrorReply):
            raise ErrorReplyError(reply.id or request_id, reply.code, reply.message)
        return reply

    def _forget(self, call: _Call) -> None:
        """Stop awaiting the reply a call was sent in once no caller of it is left waiting."""
        key = call.packed_id or call.request_id
        future = self._pending.get(key)
        if future is None:
            return
        if key == call.request_id or not any(c.packed_id == key for c in self._calls.values()):
            del self._pending[key]
            if not future.done():
                future.cancel()

    async def _send_calls(self, calls: list[_Call]) -> None:
        """Publish one request for ``calls`` (packed when there are several) and await the broker's confirm.

        Failures to connect or publish go to the calls concerned; the reply reaches them through
        :meth:`_on_reply` (and :meth:`_unpack` for a packed request).
        """
        loop = asyncio.get_running_loop()
        left_s = min(c.deadline_s for c in calls) - loop.time()
        if left_s <= 0:
            return  # their callers time out now; nothing would compute it in time
        if len(calls) == 1:
            request_id, inputs, future = calls[0].request_id, calls[0].inputs, calls[0].future
        else:
            request_id, inputs, future = uuid.uuid4().hex, concat_rows([c.inputs for c in calls]), loop.create_future()
            future.add_done_callback(functools.partial(self._unpack, calls))
            for call in calls:
                call.packed_id = request_id
        first = calls[0]
        try:
            body = encode_request(
                inputs, self.content_type, request_id=request_id, outputs=first.outputs, parameters=first.parameters
            )
            message = request_message(
                body, request_id=request_id, content_type=self.content_type, reply_to=DIRECT_REPLY_TO, timeout_s=left_s
            )
            if not self.is_connected:
                await self.connect()
            assert self._channel is not None
            self._pending[request_id] = future
            self._traces.start(message, first.target.routing_key)
            if len(calls) > 1:
                future.add_done_callback(functools.partial(self._end_trace, request_id))
            await publish_request(self._channel, message, first.target)
        except Exception as e:
            self._pending.pop(request_id, None)
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(e)

    def _end_trace(self, request_id: str, future: asyncio.Future[InferReply | ErrorReply]) -> None:
        """End the span of a packed request once its reply (or failure) is in."""
        if future.cancelled():
            self._traces.end(request_id, RequestTimeoutError("no caller awaits the reply any more"))
            return
        error = future.exception()
        self._traces.end(request_id, error, code=None if error else _error_code(future))

    def _unpack(self, calls: list[_Call], future: asyncio.Future[InferReply | ErrorReply]) -> None:
        """Hand each caller of a packed request its own reply: its rows, or the error that concerns it."""
        if future.cancelled():
            return
        error = future.exception()
        waiting = [c for c in calls if not c.future.done()]
        if error is not None:
            for call in waiting:
                call.future.set_exception(error)
            return
        reply = future.result()
        if isinstance(reply, ErrorReply):
            if reply.code in _SHARED_ERRORS:
                for call in waiting:
                    call.future.set_result(ErrorReply(id=call.request_id, code=reply.code, message=reply.message))
            else:  # one call's rows may be at fault: each goes again alone, so only it gets the error
                log.debug("client_packed_error_resending", code=reply.code, calls=len(waiting))
                for call in waiting:
                    call.packed_id = None
                    self._tasks.spawn(self._send_calls([call]))
            return
        try:
            parts = split_rows(reply.outputs, [c.rows for c in calls])
        except ProtocolError as e:
            for call in waiting:
                call.future.set_exception(e)
            return
        packed = {"requests": len(calls), "rows": sum(c.rows for c in calls)}
        for call, outputs in zip(calls, parts, strict=True):
            if not call.future.done():
                call.future.set_result(
                    InferReply(
                        id=call.request_id,
                        model_name=reply.model_name,
                        model_version=reply.model_version,
                        outputs=outputs,
                        parameters={**reply.parameters, "coalesced": packed},
                    )
                )

    async def infer_text(
        self,
        texts: Sequence[str],
        *,
        input_name: str = TEXT_INPUT,
        timeout_s: float | None = None,
        outputs: Sequence[str] | None = None,
        request_id: str | None = None,
        queue: str | None = None,
        version: str | None = None,
    ) -> InferReply:
        """Send strings (one row each) to a text model; the default model answers ``embedding`` [rows, 384].

        Args:
            texts: one string per row.
            input_name: the text input's name (``text``).
            timeout_s, outputs, request_id, queue, version: as for :meth:`infer`.
        """
        array = np.empty(len(texts), dtype=object)
        array[:] = list(texts)
        return await self.infer(
            {input_name: array},
            timeout_s=timeout_s,
            outputs=outputs,
            request_id=request_id,
            queue=queue,
            version=version,
        )

    async def metadata(
        self, *, timeout_s: float | None = None, queue: str | None = None, version: str | None = None
    ) -> ModelMetadata:
        """Ask a worker what its model takes and returns (OIP model metadata); costs no model run.

        Goes where :meth:`infer` would: the queue, a pinned version's queue, or the model's route (any
        live version answers; ``versions`` says which).

        Args:
            timeout_s, queue, version: as for :meth:`infer`.

        Raises:
            RequestTimeoutError, ErrorReplyError, PublishRefusedError, ConnectionLostError: as for :meth:`infer`.
            ProtocolError: the reply is not model metadata (a worker older than metadata requests).
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        target = self._target(queue, version)
        request_id = uuid.uuid4().hex
        message = metadata_message(
            request_id, content_type=self.content_type, reply_to=DIRECT_REPLY_TO, timeout_s=timeout_s
        )
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                if not self.is_connected:
                    await self.connect()
                assert self._channel is not None
                self._metadata_pending[request_id] = future
                await publish_request(self._channel, message, target)
                body = await future
        except TimeoutError:
            raise RequestTimeoutError(f"no metadata reply from {target.where} within {timeout_s:g} s") from None
        finally:
            self._metadata_pending.pop(request_id, None)
        reply = decode_metadata(body, self.content_type)
        if isinstance(reply, ErrorReply):
            raise ErrorReplyError(reply.id or request_id, reply.code, reply.message)
        log.debug("client_metadata", model=reply.name, versions=reply.versions)
        return reply

    def _target(self, queue: str | None, version: str | None) -> Target:
        """Where a call goes: a queue, a pinned version's queue, or a model's route."""
        version = version or self.version
        if self.model is None:
            if version is not None:
                raise ValueError(f"version={version!r} pins a version of a model: create the client with model=")
            return resolve_target(queue=queue or self.queue)
        if version is not None:
            check_route_name("model version", version)
        return resolve_target(queue=self.queue, model=self.model, version=version)


def _error_code(future: asyncio.Future[InferReply | ErrorReply]) -> str | None:
    """The code of the error reply a finished call received, else None."""
    if future.cancelled() or future.exception() is not None:
        return None
    reply = future.result()
    return reply.code if isinstance(reply, ErrorReply) else None
