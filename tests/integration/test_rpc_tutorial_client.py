"""An RPC client written as RabbitMQ's RPC tutorial writes one, against a real worker process.

The client declares an exclusive queue with an empty name (the broker names it ``amq.gen-...``),
publishes each request with ``reply_to`` set to that name and a ``correlation_id``, and consumes its
replies from that queue. A ``reply_to`` naming another service's work queue is still refused
(dead-lettered, nothing written into that queue), and a server-named queue that is gone makes the
reply unroutable (``NO_ROUTE``): dead-lettered once, never retried.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import numpy as np
import pytest

from producer.wire.names import CONTENT_TYPE_MSGPACK, SERVER_NAMED_QUEUE_PATTERN, dead_letter_queue
from producer.wire.protocol import InferReply, encode_request
from tests.support.models import affine_model
from tests.support.worker_process import WorkerProcess
from tests.support.workers import decoded

pytestmark = pytest.mark.integration

TIMEOUT_S = 60


@pytest.fixture(scope="module")
def affine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return affine_model(tmp_path_factory.mktemp("models") / "affine.onnx")


@pytest.fixture
async def worker(amqp_url: str, affine: Path, queue: str) -> AsyncIterator[WorkerProcess]:
    async with WorkerProcess(amqp_url, affine, queue) as process:
        yield process


def _request(value: float) -> bytes:
    return encode_request({"x": np.full((1, 4), value, np.float32)}, CONTENT_TYPE_MSGPACK)


async def _publish(channel: aio_pika.abc.AbstractChannel, queue: str, cid: str, reply_to: str, value: float) -> None:
    message = aio_pika.Message(
        _request(value), content_type=CONTENT_TYPE_MSGPACK, correlation_id=cid, reply_to=reply_to
    )
    await channel.default_exchange.publish(message, routing_key=queue)


async def _dead_letters(
    channel: aio_pika.abc.AbstractChannel, queue: str, count: int
) -> dict[str, aio_pika.abc.AbstractIncomingMessage]:
    """The first ``count`` dead letters of ``queue``, by correlation id (consumed and acked)."""
    dead: dict[str, aio_pika.abc.AbstractIncomingMessage] = {}
    enough = asyncio.Event()

    async def on_dead(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        dead[message.correlation_id or ""] = message
        if len(dead) >= count:
            enough.set()

    dlq = await channel.declare_queue(dead_letter_queue(queue), passive=True)
    tag = await dlq.consume(on_dead)
    await asyncio.wait_for(enough.wait(), TIMEOUT_S)
    await dlq.cancel(tag)
    return dead


async def test_a_tutorial_rpc_client_with_a_server_named_reply_queue_gets_every_reply(
    worker: WorkerProcess, queue: str, connection: aio_pika.abc.AbstractConnection
) -> None:
    channel = await connection.channel()
    callback_queue = await channel.declare_queue(exclusive=True)  # empty name: the broker names it
    assert re.fullmatch(SERVER_NAMED_QUEUE_PATTERN, callback_queue.name), callback_queue.name
    loop = asyncio.get_running_loop()
    futures: dict[str, asyncio.Future[aio_pika.abc.AbstractIncomingMessage]] = {}

    async def on_response(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        future = futures.pop(message.correlation_id or "", None)
        if future is not None:
            future.set_result(message)

    await callback_queue.consume(on_response)
    pending = []
    for i in range(20):
        cid = str(uuid.uuid4())
        futures[cid] = future = loop.create_future()
        pending.append(future)
        await _publish(channel, queue, cid, callback_queue.name, float(i))
    replies = [decoded(m) for m in await asyncio.wait_for(asyncio.gather(*pending), TIMEOUT_S)]
    for i, reply in enumerate(replies):
        assert isinstance(reply, InferReply), reply
        np.testing.assert_array_equal(reply.outputs["y"], np.full((1, 4), 2.0 * i + 1.0, np.float32))
    assert not worker.events("reply_to_refused")


async def test_a_reply_to_naming_another_services_work_queue_is_still_refused(
    worker: WorkerProcess, queue: str, connection: aio_pika.abc.AbstractConnection, cleanup_queues: list[str]
) -> None:
    channel = await connection.channel()
    other_service = f"test.orders.work.{uuid.uuid4().hex[:8]}"  # a work queue of some other service
    cleanup_queues.append(other_service)
    await channel.declare_queue(other_service, durable=True)
    callback_queue = await channel.declare_queue(exclusive=True)
    # One good request beside the refused ones: its reply shows the worker has handled them all.
    answered: asyncio.Future[aio_pika.abc.AbstractIncomingMessage] = asyncio.get_running_loop().create_future()

    async def on_response(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        if not answered.done():
            answered.set_result(message)

    await callback_queue.consume(on_response)
    refused = [f"refused-{i}" for i in range(5)]
    for cid in refused:
        await _publish(channel, queue, cid, other_service, 1.0)
    await _publish(channel, queue, "good", callback_queue.name, 1.0)
    assert isinstance(decoded(await asyncio.wait_for(answered, TIMEOUT_S)), InferReply)
    dead = await _dead_letters(channel, queue, len(refused))
    assert sorted(dead) == refused
    assert {m.headers["x-death"][0]["reason"] for m in dead.values()} == {"rejected"}  # type: ignore[index,call-overload]
    logged = await worker.wait_for_async("reply_to_refused", match={"request_id": refused[-1]})
    assert "WORKER_REPLY_TO_PATTERN" in logged["why"]
    assert len(worker.events("reply_to_refused")) == len(refused)
    untouched = await channel.declare_queue(other_service, passive=True)
    assert untouched.declaration_result.message_count == 0, "a reply was written into another service's queue"


async def test_a_reply_to_a_server_named_queue_that_is_gone_is_dead_lettered_once(
    worker: WorkerProcess, queue: str, amqp_url: str, connection: aio_pika.abc.AbstractConnection
) -> None:
    gone_client = await aio_pika.connect(amqp_url)
    gone = (await (await gone_client.channel()).declare_queue(exclusive=True)).name
    await gone_client.close()  # its exclusive queue goes with its connection
    channel = await connection.channel()
    await _publish(channel, queue, "orphan", gone, 1.0)
    dead = await _dead_letters(channel, queue, 1)
    assert list(dead) == ["orphan"]
    unroutable = await worker.wait_for_async("reply_unroutable", match={"request_id": "orphan"})
    assert unroutable["reply_to"] == gone
    assert len(worker.events("reply_unroutable")) == 1, "NO_ROUTE is permanent: the reply was retried"
