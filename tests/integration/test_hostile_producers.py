"""Hostile or careless producers against a real worker: no message may stop it or cost a neighbour its reply.

Each test ends by stopping the worker and counting what is left in the request queue: a delivery the
worker never settled goes back to the queue when its channel closes, so an empty queue proves every
request was acked (or dead-lettered, which the dead-letter count shows).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from pathlib import Path

import aio_pika
import msgspec
import numpy as np
import pytest

from producer.names import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, DIRECT_REPLY_TO, dead_letter_queue
from producer.protocol import ErrorReply, InferReply, encode_request
from tests.models import affine_model
from tests.workers import RpcClient, Sent, decoded, running_worker

pytestmark = pytest.mark.integration

# A pid term in the shape RabbitMQ issues (version 131, NEW_PID_EXT, a UTF-8 atom node) on a node no
# broker has: well-formed, so only the broker can tell, and RabbitMQ 3.x closes the connection for it.
_FORGED_PID = b"\x83Xv\x00\x0erabbit@nohost1" + bytes(12)
FORGED_DIRECT_REPLY_TO = f"{DIRECT_REPLY_TO}.{base64.b64encode(_FORGED_PID).decode()}.a2V5a2V5a2V5a2V5"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return affine_model(tmp_path_factory.mktemp("models") / "affine.onnx")


@pytest.fixture
async def rpc(connection: aio_pika.abc.AbstractConnection) -> RpcClient:
    return await RpcClient.open(connection)


@pytest.fixture
async def dead_letters(
    connection: aio_pika.abc.AbstractConnection, queue: str
) -> asyncio.Queue[aio_pika.abc.AbstractIncomingMessage]:
    """Whatever the request queue dead-letters, as it arrives (declared as the worker declares it)."""
    channel = await connection.channel()
    dlq = await channel.declare_queue(dead_letter_queue(queue), durable=True, arguments={"x-queue-type": "quorum"})
    received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    await dlq.consume(received.put, no_ack=True)
    return received


def valid(i: int) -> Sent:
    x = np.full((1, 4), i, dtype=np.float32)
    return Sent(encode_request({"x": x}, CONTENT_TYPE_MSGPACK), CONTENT_TYPE_MSGPACK, correlation_id=f"valid-{i}")


def assert_valid_answers(messages: list[aio_pika.abc.AbstractIncomingMessage], first: int = 0) -> None:
    for i, message in enumerate(messages, start=first):
        reply = decoded(message)
        assert isinstance(reply, InferReply), reply
        assert message.correlation_id == f"valid-{i}"
        np.testing.assert_array_equal(reply.outputs["y"], np.full((1, 4), 2 * i + 1, dtype=np.float32))


async def ready_count(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    channel = await connection.channel()
    declared = await channel.declare_queue(queue, passive=True)
    await channel.close()
    return declared.declaration_result.message_count or 0


def _msgpack_with_invalid_utf8_name() -> bytes:
    body = msgspec.msgpack.encode({"inputs": [{"name": "AB", "datatype": "FP32", "shape": [1, 4], "data": bytes(16)}]})
    return body.replace(b"\xa2AB", b"\xa2\xff\xfe", 1)  # fixstr of 2 bytes that are not UTF-8


POISON: dict[str, Sent] = {
    "huge-zero-size-shape": Sent(
        json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 4611686018427387904], "data": []}]}
        ).encode(),
        correlation_id="poison-shape",
    ),
    "deep-json": Sent(b'{"inputs":' + b"[" * 5000 + b"]" * 5000 + b"}", correlation_id="poison-deep"),
    "invalid-utf8-msgpack": Sent(_msgpack_with_invalid_utf8_name(), CONTENT_TYPE_MSGPACK, correlation_id="poison-utf8"),
    "garbage-msgpack": Sent(b"\xc1\xff\x00" * 30, CONTENT_TYPE_MSGPACK, correlation_id="poison-garbage"),
    "wrong-header-types": Sent(
        encode_request({"x": np.zeros((1, 4), np.float32)}, CONTENT_TYPE_JSON),
        correlation_id="poison-headers",
        headers={"x-deadline-ms": "tomorrow", "x-published-ms": [1, 2]},
    ),
}


async def test_poison_bodies_get_error_replies_and_300_valid_requests_after_them_are_answered_and_acked(
    amqp_url: str, model: Path, rpc: RpcClient, queue: str, connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_worker(amqp_url, model, queue):
        poison = await rpc.call_many(queue, list(POISON.values()), timeout_s=30)
        answers = await rpc.call_many(queue, [valid(i) for i in range(300)], timeout_s=60)
    replies = {name: decoded(message) for name, message in zip(POISON, poison, strict=True)}
    for name in ("huge-zero-size-shape", "deep-json", "invalid-utf8-msgpack", "garbage-msgpack"):
        reply = replies[name]
        assert isinstance(reply, ErrorReply), (name, reply)
        assert reply.code in {"bad_encoding", "invalid_tensor"}, (name, reply)
        assert reply.id == POISON[name].correlation_id
    assert isinstance(replies["wrong-header-types"], InferReply)  # headers of the wrong type are ignored
    assert_valid_answers(answers)
    assert await ready_count(connection, queue) == 0, "a delivery was left unacked and went back to the queue"


async def test_replies_to_a_missing_results_queue_are_dead_lettered_at_once_and_delay_no_one(
    amqp_url: str,
    model: Path,
    rpc: RpcClient,
    queue: str,
    connection: aio_pika.abc.AbstractConnection,
    dead_letters: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage],
) -> None:
    gone = f"results.gone-{uuid.uuid4().hex[:8]}"  # allowed by the pattern, never declared
    body = encode_request({"x": np.zeros((1, 4), np.float32)}, CONTENT_TYPE_MSGPACK)
    orphans = [Sent(body, CONTENT_TYPE_MSGPACK, reply_to=gone, correlation_id=f"orphan-{i}") for i in range(3)]
    latencies_s: list[float] = []

    async def timed(sent: Sent) -> aio_pika.abc.AbstractIncomingMessage:
        started = time.perf_counter()
        message = await rpc.call(queue, sent, timeout_s=60)
        latencies_s.append(time.perf_counter() - started)
        return message

    async with running_worker(amqp_url, model, queue):
        for orphan in orphans:
            await rpc.publish(queue, orphan)
        answers = await asyncio.gather(*(timed(valid(i)) for i in range(416)))
        dead = [await asyncio.wait_for(dead_letters.get(), 30) for _ in orphans]
    assert_valid_answers(list(answers))
    assert sorted(m.correlation_id or "" for m in dead) == [f"orphan-{i}" for i in range(3)]
    assert all(m.headers["x-death"][0]["reason"] == "rejected" for m in dead)  # type: ignore[index]
    assert await ready_count(connection, queue) == 0
    p99_ms = float(np.percentile(latencies_s, 99)) * 1000
    print(f"valid requests beside 3 unroutable replies: p99 {p99_ms:.0f} ms over {len(latencies_s)}")


async def test_a_forged_direct_reply_to_costs_no_neighbour_its_reply(
    amqp_url: str,
    model: Path,
    rpc: RpcClient,
    queue: str,
    connection: aio_pika.abc.AbstractConnection,
    dead_letters: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage],
) -> None:
    body = encode_request({"x": np.zeros((1, 4), np.float32)}, CONTENT_TYPE_MSGPACK)
    forged = [
        Sent(body, CONTENT_TYPE_MSGPACK, reply_to=FORGED_DIRECT_REPLY_TO, correlation_id="forged-pid"),
        Sent(body, CONTENT_TYPE_MSGPACK, reply_to=f"{DIRECT_REPLY_TO}.g2gDZA.eA==", correlation_id="forged-term"),
        Sent(body, CONTENT_TYPE_MSGPACK, reply_to=f"{DIRECT_REPLY_TO}.garbage", correlation_id="forged-garbage"),
    ]
    async with running_worker(amqp_url, model, queue):
        pending = [asyncio.ensure_future(rpc.call(queue, valid(i), timeout_s=60)) for i in range(100)]
        for sent in forged:
            await rpc.publish(queue, sent)
        pending += [asyncio.ensure_future(rpc.call(queue, valid(i), timeout_s=60)) for i in range(100, 200)]
        answers = await asyncio.gather(*pending)
        dead = [await asyncio.wait_for(dead_letters.get(), 30) for _ in forged]
    assert_valid_answers(list(answers))
    assert sorted(m.correlation_id or "" for m in dead) == ["forged-garbage", "forged-pid", "forged-term"]
    assert await ready_count(connection, queue) == 0


async def test_a_reply_to_outside_the_pattern_is_dead_lettered_and_never_written_there(
    amqp_url: str,
    model: Path,
    rpc: RpcClient,
    queue: str,
    connection: aio_pika.abc.AbstractConnection,
    cleanup_queues: list[str],
    dead_letters: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage],
) -> None:
    victim = f"victim-{uuid.uuid4().hex[:8]}"
    cleanup_queues.append(victim)
    channel = await connection.channel()
    await channel.declare_queue(victim, durable=True)
    body = encode_request({"x": np.zeros((1, 4), np.float32)}, CONTENT_TYPE_MSGPACK)
    async with running_worker(amqp_url, model, queue):
        await rpc.publish(queue, Sent(body, CONTENT_TYPE_MSGPACK, reply_to=victim, correlation_id="aimed"))
        dead = await asyncio.wait_for(dead_letters.get(), 30)
        answers = await rpc.call_many(queue, [valid(i) for i in range(20)])
    assert dead.correlation_id == "aimed"
    assert_valid_answers(answers)
    assert await ready_count(connection, victim) == 0


async def test_an_oversized_input_name_gets_a_bounded_error_and_costs_no_neighbour_its_reply(
    amqp_url: str, model: Path, rpc: RpcClient, queue: str, connection: aio_pika.abc.AbstractConnection
) -> None:
    name = "\x00" * 34_000_000
    body = msgspec.msgpack.encode({"inputs": [{"name": name, "datatype": "FP32", "shape": [1, 4], "data": bytes(16)}]})
    big = Sent(body, CONTENT_TYPE_MSGPACK, correlation_id="big-name")
    async with running_worker(amqp_url, model, queue, max_message_bytes=48 * 1024 * 1024):
        pending = [asyncio.ensure_future(rpc.call(queue, valid(i), timeout_s=60)) for i in range(50)]
        big_reply = await rpc.call(queue, big, timeout_s=60)
        pending += [asyncio.ensure_future(rpc.call(queue, valid(i), timeout_s=60)) for i in range(50, 100)]
        answers = await asyncio.gather(*pending)
    assert len(big_reply.body) < 4096
    reply = decoded(big_reply)
    assert isinstance(reply, ErrorReply)
    assert reply.code == "unknown_input"
    assert_valid_answers(list(answers))
    assert await ready_count(connection, queue) == 0


async def test_a_body_over_the_size_limit_is_refused_before_decoding(
    amqp_url: str, model: Path, rpc: RpcClient, queue: str
) -> None:
    body = encode_request({"x": np.zeros((20_000, 4), np.float32)}, CONTENT_TYPE_MSGPACK)
    async with running_worker(amqp_url, model, queue, max_message_bytes=64 * 1024):
        reply = decoded(await rpc.call(queue, Sent(body, CONTENT_TYPE_MSGPACK, correlation_id="too-big")))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "message_too_large"
    assert "WORKER_MAX_MESSAGE_BYTES" in reply.message
