"""Hostile or careless producers against a real worker: no message may stop it or cost a neighbour its reply.

Each test ends by stopping the worker and counting what is left in the request queue: a delivery the
worker never settled goes back to the queue when its channel closes, so an empty queue proves every
request was acked (or dead-lettered, which the dead-letter count shows).
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import uuid
from pathlib import Path

import aio_pika
import msgspec
import numpy as np
import pytest

from producer.wire.names import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, DIRECT_REPLY_TO, dead_letter_queue
from producer.wire.protocol import ErrorReply, InferReply, encode_request
from tests.support.models import affine_model
from tests.support.worker_process import WorkerProcess
from tests.support.workers import RpcClient, Sent, decoded, running_worker

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


# -- a hostile corpus in the same batches as good requests, against a worker process ----------------------------

CORPUS_MAX_MESSAGE_BYTES = 1024 * 1024
"""The corpus worker's WORKER_MAX_MESSAGE_BYTES: the oversized bodies are twice that."""
RSS_GROWTH_LIMIT_BYTES = 64 * 1024 * 1024
"""How much the worker's resident memory may grow over the corpus rounds (allocator noise, not leaks)."""
CORPUS_ROUNDS = 4


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def _tensor(name: str = "x", datatype: str = "FP32", shape: object = (1, 4), data: object = (0, 1, 2, 3)) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def _hostile_corpus() -> dict[str, Sent]:
    """Bodies and headers a careless or hostile producer may send; each must get an error reply (or, when the
    request is valid after all, a result), and none may cost the worker its life, its memory or a neighbour."""
    valid_json = encode_request({"x": np.zeros((1, 4), np.float32)}, CONTENT_TYPE_JSON)
    valid_msgpack = encode_request({"x": np.zeros((1, 4), np.float32)}, CONTENT_TYPE_MSGPACK)
    mp = msgspec.msgpack.encode
    deep = 100_000
    bodies: dict[str, tuple[bytes, str]] = {
        "truncated-json": (valid_json[: len(valid_json) // 2], CONTENT_TYPE_JSON),
        "garbage-json": (b'{"inputs": [{]]}\x00\xff', CONTENT_TYPE_JSON),
        "empty-body": (b"", CONTENT_TYPE_JSON),
        "truncated-msgpack": (valid_msgpack[: len(valid_msgpack) - 7], CONTENT_TYPE_MSGPACK),
        "garbage-msgpack": (b"\xc1" * 64, CONTENT_TYPE_MSGPACK),
        "huge-shape-json": (_json({"inputs": [_tensor(shape=[1_000_000_000, 4])]}), CONTENT_TYPE_JSON),
        "huge-shape-msgpack": (
            mp({"inputs": [_tensor(shape=[2**31, 2**31], data=bytes(16))]}),
            CONTENT_TYPE_MSGPACK,
        ),
        "overflowing-shape": (_json({"inputs": [_tensor(shape=[2**70, 4])]}), CONTENT_TYPE_JSON),
        "negative-shape": (_json({"inputs": [_tensor(shape=[-1, 4])]}), CONTENT_TYPE_JSON),
        "shape-of-64-dims": (_json({"inputs": [_tensor(shape=[1] * 64)]}), CONTENT_TYPE_JSON),
        "nan-literal-json": (valid_json.replace(b"0.0", b"NaN", 1), CONTENT_TYPE_JSON),
        "non-finite-strings-json": (
            _json({"inputs": [_tensor(data=["NaN", "Infinity", "-Infinity", 1])]}),
            CONTENT_TYPE_JSON,
        ),
        "non-finite-msgpack": (
            mp({"inputs": [_tensor(data=np.array([np.nan, np.inf, -np.inf, 1], "<f4").tobytes())]}),
            CONTENT_TYPE_MSGPACK,
        ),
        "non-utf8-json": (_json({"inputs": [_tensor(name="xy")]}).replace(b"xy", b"\xff\xfe"), CONTENT_TYPE_JSON),
        "non-utf8-bytes-tensor": (
            mp({"inputs": [_tensor(datatype="BYTES", shape=[1, 4], data=[b"\xff\xfe"] * 4)]}),
            CONTENT_TYPE_MSGPACK,
        ),
        "deep-json": (b'{"inputs": [' + b"[" * deep + b"]" * deep + b"]}", CONTENT_TYPE_JSON),
        "deep-json-data": (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": '
            + b"[" * deep
            + b"]" * deep
            + b"}]}",
            CONTENT_TYPE_JSON,
        ),
        "deep-msgpack": (b"\x81\xa6inputs" + b"\x91" * deep + b"\x90", CONTENT_TYPE_MSGPACK),
        "msgpack-ext-data": (
            mp({"inputs": [_tensor(data=msgspec.msgpack.Ext(5, bytes(16)))]}),
            CONTENT_TYPE_MSGPACK,
        ),
        "msgpack-timestamp-name": (
            valid_msgpack.replace(b"\xa1x", b"\xd6\xff" + bytes(4), 1),
            CONTENT_TYPE_MSGPACK,
        ),
        "msgpack-ext-as-body": (b"\xc7\x10\x07" + bytes(16), CONTENT_TYPE_MSGPACK),
        "data-shorter-than-shape": (mp({"inputs": [_tensor(data=bytes(3))]}), CONTENT_TYPE_MSGPACK),
        "wrong-types-everywhere": (
            _json({"inputs": [{"name": 7, "datatype": ["FP32"], "shape": "1x4", "data": {"a": 1}}]}),
            CONTENT_TYPE_JSON,
        ),
        "unknown-content-type": (valid_json, "application/x-pickle"),
        "oversized-json": (
            b'{"inputs": [], "id": "' + b"a" * (2 * CORPUS_MAX_MESSAGE_BYTES) + b'"}',
            CONTENT_TYPE_JSON,
        ),
        "oversized-msgpack": (
            mp({"inputs": [_tensor(data=bytes(2 * CORPUS_MAX_MESSAGE_BYTES))]}),
            CONTENT_TYPE_MSGPACK,
        ),
    }
    corpus = {
        name: Sent(body, content_type, correlation_id=f"hostile-{name}")
        for name, (body, content_type) in bodies.items()
    }
    for name, headers in {
        "header-deadline-text": {"x-deadline-ms": "tomorrow"},
        "header-deadline-huge": {"x-deadline-ms": 2**63 - 1},
        "header-deadline-negative": {"x-deadline-ms": -5},
        "header-published-list": {"x-published-ms": [1, 2, 3]},
        "header-published-float": {"x-published-ms": -1.5},
        "header-published-table": {"x-published-ms": {"nested": {"deeper": "x" * 1000}}},
    }.items():
        corpus[name] = Sent(valid_msgpack, CONTENT_TYPE_MSGPACK, correlation_id=f"hostile-{name}", headers=headers)
    return corpus


# Requests in the corpus that are valid after all (odd headers are ignored; non-finite values are numbers).
VALID_IN_CORPUS = {
    "non-finite-strings-json",
    "non-finite-msgpack",
    "header-deadline-text",
    "header-deadline-huge",
    "header-published-list",
    "header-published-float",
    "header-published-table",
}


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def test_a_hostile_corpus_in_the_same_batches_as_good_requests_costs_the_worker_neither_life_nor_memory(
    amqp_url: str, model: Path, rpc: RpcClient, queue: str, connection: aio_pika.abc.AbstractConnection
) -> None:
    corpus = _hostile_corpus()
    extra = ("--max-message-bytes", str(CORPUS_MAX_MESSAGE_BYTES), "--max-batch", "32", "--prefetch", "256")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with WorkerProcess(amqp_url, model, queue, *extra, http_port=port, name="hostile-corpus") as worker:
        assert worker.pid is not None
        warm = await rpc.call_many(queue, [valid(i) for i in range(200)], timeout_s=60)
        assert_valid_answers(warm)
        rss_before = rss_bytes(worker.pid)
        for round_ in range(CORPUS_ROUNDS):
            # Good and hostile requests interleaved in one burst, so they share prefetch windows and batches.
            mixed: list[Sent] = []
            for i, sent in enumerate(corpus.values()):
                mixed += [valid(4 * i), sent, valid(4 * i + 1), valid(4 * i + 2), valid(4 * i + 3)]
            answers = await rpc.call_many(queue, mixed, timeout_s=120)
            replies = {m.correlation_id: m for m in answers}
            assert_valid_answers([replies[f"valid-{i}"] for i in range(4 * len(corpus))])
            for name in corpus:
                reply = decoded(replies[f"hostile-{name}"])
                if name in VALID_IN_CORPUS:
                    assert isinstance(reply, InferReply), (name, reply)
                else:
                    assert isinstance(reply, ErrorReply), (name, reply)
                    assert reply.code != "internal", (name, reply)  # every hostile body has a code of its own
                    assert len(reply.message) <= 2100, (name, len(reply.message))
            if round_ == 0:
                codes = {n: decoded(replies[f"hostile-{n}"]) for n in corpus}
                print({n: getattr(r, "code", "ok") for n, r in codes.items()})
        rss_after = rss_bytes(worker.pid)
        assert worker.returncode is None, "the worker died"
        assert worker.readyz() == 200
    growth = rss_after - rss_before
    mib = 1024 * 1024
    print(
        f"worker RSS: {rss_before / mib:.1f} MiB after warm-up, {rss_after / mib:.1f} MiB after {CORPUS_ROUNDS} rounds "
        f"of {len(corpus)} hostile requests beside {4 * len(corpus)} good ones each (growth {growth / mib:+.1f} MiB)"
    )
    assert growth < RSS_GROWTH_LIMIT_BYTES
    assert await ready_count(connection, queue) == 0
