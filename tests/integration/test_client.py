"""The RPC client against a real broker and real ``worker run`` processes."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import numpy as np
import pytest

from producer import Client, SyncClient
from producer.wire.errors import ConnectionLostError, ErrorReplyError, PublishRefusedError, RequestTimeoutError
from producer.wire.names import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, dead_letter_queue
from tests.support.models import affine_model
from tests.support.worker_process import WorkerProcess

pytestmark = pytest.mark.integration

TEXT_MODEL = Path(__file__).resolve().parents[2] / "models" / "all-MiniLM-L6-v2"


async def _delete_queues(amqp_url: str, *names: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name, if_unused=False, if_empty=False)


@pytest.fixture(scope="module")
def affine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return affine_model(tmp_path_factory.mktemp("models") / "affine.onnx")


@pytest.fixture(scope="module")
def worker_queue(amqp_url: str, affine: Path) -> Iterator[str]:
    """A queue with one affine-model worker process consuming it, shared by this module's tests."""
    queue = f"test.client.{uuid.uuid4().hex[:8]}"
    try:
        with WorkerProcess(amqp_url, affine, queue):
            yield queue
    finally:
        asyncio.run(_delete_queues(amqp_url, queue, dead_letter_queue(queue)))


@pytest.fixture
async def client(amqp_url: str, worker_queue: str) -> AsyncIterator[Client]:
    async with Client(amqp_url, queue=worker_queue, timeout_s=30) as c:
        yield c


@pytest.mark.parametrize("content_type", [CONTENT_TYPE_MSGPACK, CONTENT_TYPE_JSON])
async def test_infer_round_trips_a_tensor(amqp_url: str, worker_queue: str, content_type: str) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    async with Client(amqp_url, queue=worker_queue, content_type=content_type) as client:
        reply = await client.infer({"x": x}, timeout_s=30, request_id="req-1")
    assert (reply.id, reply.model_name) == ("req-1", "affine")
    np.testing.assert_array_equal(reply.outputs["y"], x * 2 + 1)


async def test_200_concurrent_calls_share_one_connection(client: Client) -> None:
    inputs = [np.full((1 + i % 3, 4), i, dtype=np.float32) for i in range(200)]
    replies = await asyncio.gather(*(client.infer({"x": x}) for x in inputs))
    for x, reply in zip(inputs, replies, strict=True):
        np.testing.assert_array_equal(reply.outputs["y"], x * 2 + 1)


async def test_error_reply_raises_with_its_code(client: Client) -> None:
    with pytest.raises(ErrorReplyError) as caught:
        await client.infer({"x": np.ones((1, 3), np.float32)}, request_id="bad-shape")
    assert caught.value.code == "wrong_shape"
    assert caught.value.request_id == "bad-shape"
    # The client keeps working after an error reply.
    reply = await client.infer({"x": np.zeros((1, 4), np.float32)})
    np.testing.assert_array_equal(reply.outputs["y"], np.ones((1, 4), np.float32))


async def test_publish_to_a_missing_queue_raises_instead_of_hanging(amqp_url: str) -> None:
    async with Client(amqp_url, queue=f"test.missing.{uuid.uuid4().hex}") as client:
        with pytest.raises(PublishRefusedError, match="no queue named"):
            await client.infer({"x": np.ones((1, 4), np.float32)}, timeout_s=30)


async def test_timeout_raises_and_the_worker_skips_the_expired_request(amqp_url: str, affine: Path) -> None:
    queue = f"test.client.expiry.{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(amqp_url, affine, queue)
    try:
        await worker.start().wait_ready_async()
        # A stopped worker still receives the request into its prefetch window, so the broker
        # cannot expire it; the worker sees it only after its deadline has passed.
        worker.signal(signal.SIGSTOP)
        try:
            async with Client(amqp_url, queue=queue) as client:
                with pytest.raises(RequestTimeoutError, match=r"within 0\.3 s"):
                    await client.infer({"x": np.ones((1, 4), np.float32)}, timeout_s=0.3, request_id="late-1")
        finally:
            worker.signal(signal.SIGCONT)
        event = await worker.wait_for_async("deadline_exceeded")
        assert event["request_id"] == "late-1"
    finally:
        await worker.stop_async()
        await _delete_queues(amqp_url, queue, dead_letter_queue(queue))


async def test_lost_connection_fails_waiting_calls_and_the_next_call_reconnects(amqp_url: str) -> None:
    queue = f"test.client.lost.{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        request_queue = await channel.declare_queue(queue, exclusive=True)
        await request_queue.consume(received.put, no_ack=True)  # receives requests, never replies
        async with Client(amqp_url, queue=queue) as client:
            call = asyncio.create_task(client.infer({"x": np.ones((1, 4), np.float32)}, timeout_s=30))
            await received.get()
            assert client._connection is not None
            await client._connection.close(ConnectionResetError("connection dropped"))
            with pytest.raises(ConnectionLostError):
                await call
            assert not client.is_connected
            # The next call opens a new connection; it times out since nobody replies.
            with pytest.raises(RequestTimeoutError):
                await client.infer({"x": np.ones((1, 4), np.float32)}, timeout_s=0.2)
            assert client.is_connected


def test_sync_client_round_trips_for_scripts(amqp_url: str, worker_queue: str) -> None:
    with SyncClient(amqp_url, queue=worker_queue) as client:
        reply = client.infer({"x": np.ones((2, 4), np.float32)}, timeout_s=30)
        with pytest.raises(ErrorReplyError):
            client.infer({"x": np.ones((2, 5), np.float32)}, timeout_s=30)
    np.testing.assert_array_equal(reply.outputs["y"], np.full((2, 4), 3, np.float32))


@pytest.mark.skipif(not TEXT_MODEL.exists(), reason=f"{TEXT_MODEL} is absent (make model)")
async def test_infer_text_returns_one_embedding_per_string(amqp_url: str) -> None:
    queue = f"test.client.text.{uuid.uuid4().hex[:8]}"
    try:
        async with WorkerProcess(amqp_url, TEXT_MODEL, queue), Client(amqp_url, queue=queue) as client:
            reply = await client.infer_text(["hello world", "a second, longer sentence"], timeout_s=60)
    finally:
        await _delete_queues(amqp_url, queue, dead_letter_queue(queue))
    embedding = reply.outputs["embedding"]
    assert embedding.shape == (2, 384)
    assert embedding.dtype == np.float32
    assert not np.allclose(embedding[0], embedding[1])
