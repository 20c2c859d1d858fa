"""Test helpers: an in-process worker, and an RPC client that publishes many requests at once.

Worker processes start through :mod:`tests.support.worker_process`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
from opentelemetry.trace import TracerProvider

from producer.wire.names import DIRECT_REPLY_TO, HEADER_DEADLINE_MS, HEADER_PUBLISHED_MS
from producer.wire.protocol import ErrorReply, InferReply, decode_reply
from worker.pipelines.tensor import load_pipeline
from worker.service import Worker
from worker.settings import Settings


@contextlib.asynccontextmanager
async def running_worker(
    amqp_url: str,
    model: Path,
    queue: str,
    *,
    pipeline: Any = None,
    tracer_provider: TracerProvider | None = None,
    **settings: Any,
) -> AsyncIterator[Worker]:
    """A worker consuming ``queue`` in this event loop; stopped (drained) on exit.

    Args:
        pipeline: a loaded (or wrapped) pipeline to serve; loaded from ``model`` when None.
        tracer_provider: where the worker's spans go (default: the global provider).
        settings: more :class:`Settings` fields.
    """
    s = Settings.from_env({}, amqp_url=amqp_url, model=model, queue=queue, http_port=0, **settings)
    worker = Worker(
        s, pipeline or load_pipeline(s.model_config), install_signal_handlers=False, tracer_provider=tracer_provider
    )
    task = asyncio.create_task(worker.run())
    started = asyncio.create_task(worker.consuming_event.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()
    try:
        yield worker
    finally:
        worker.stop_event.set()
        await task


@dataclass
class Sent:
    body: bytes
    content_type: str = "application/json"
    reply_to: str | None = DIRECT_REPLY_TO
    correlation_id: str | None = None
    timeout_s: float | None = None
    headers: dict[str, Any] | None = None


class RpcClient:
    """Publishes raw request bodies over direct reply-to and collects every reply by correlation id."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel) -> None:
        self.channel = channel
        self.replies: dict[str, list[aio_pika.abc.AbstractIncomingMessage]] = {}
        self._waiters: dict[str, asyncio.Future[aio_pika.abc.AbstractIncomingMessage]] = {}

    @classmethod
    async def open(cls, connection: aio_pika.abc.AbstractConnection) -> RpcClient:
        channel = await connection.channel(publisher_confirms=True)
        client = cls(channel)
        queue = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await queue.consume(client._on_reply, no_ack=True)
        return client

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        cid = message.correlation_id or ""
        self.replies.setdefault(cid, []).append(message)
        waiter = self._waiters.pop(cid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)

    async def publish(self, queue: str, sent: Sent) -> asyncio.Future[aio_pika.abc.AbstractIncomingMessage]:
        """Publish one request; the returned future resolves with its (first) reply."""
        cid = sent.correlation_id or uuid.uuid4().hex
        now_ms = int(time.time() * 1000)
        headers: dict[str, Any] = {HEADER_PUBLISHED_MS: now_ms, **(sent.headers or {})}
        if sent.timeout_s is not None:
            headers[HEADER_DEADLINE_MS] = now_ms + int(sent.timeout_s * 1000)
        waiter = self._waiters.setdefault(cid, asyncio.get_running_loop().create_future())
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                sent.body,
                content_type=sent.content_type,
                correlation_id=cid,
                reply_to=sent.reply_to,
                headers=headers,
            ),
            routing_key=queue,
        )
        return waiter

    async def call(self, queue: str, sent: Sent, timeout_s: float = 30.0) -> aio_pika.abc.AbstractIncomingMessage:
        return await asyncio.wait_for(await self.publish(queue, sent), timeout_s)

    async def call_many(
        self, queue: str, sent: Sequence[Sent], timeout_s: float = 60.0
    ) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Publish all, then wait for all replies (in the order sent)."""
        futures = await asyncio.gather(*(self.publish(queue, s) for s in sent))
        return list(await asyncio.wait_for(asyncio.gather(*futures), timeout_s))


def decoded(message: aio_pika.abc.AbstractIncomingMessage) -> InferReply | ErrorReply:
    return decode_reply(message.body, message.content_type)
