"""The worker end to end against a real RabbitMQ and real ONNX Runtime sessions."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aio_pika
import msgspec
import numpy as np
import onnxruntime as ort
import pytest

from producer.wire.names import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, dead_letter_queue
from producer.wire.protocol import ErrorReply, InferReply, encode_request
from tests.support.models import affine_model, mlp_model, two_io_model
from tests.support.workers import RpcClient, Sent, decoded, running_worker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "affine": affine_model(root / "affine.onnx"),
        "mlp": mlp_model(root / "mlp.onnx", width=16, hidden=8),
        "two_io": two_io_model(root / "two_io.onnx"),
    }


@pytest.fixture
async def rpc(connection: aio_pika.abc.AbstractConnection) -> RpcClient:
    return await RpcClient.open(connection)


def _reference(model: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


@pytest.mark.parametrize("content_type", [CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK])
async def test_results_equal_a_direct_onnx_runtime_run(
    amqp_url: str, models: dict[str, Path], rpc: RpcClient, queue: str, content_type: str
) -> None:
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    async with running_worker(amqp_url, models["mlp"], queue):
        message = await rpc.call(queue, Sent(encode_request({"x": x}, content_type, request_id="r1"), content_type))
    assert message.content_type == content_type
    reply = decoded(message)
    assert isinstance(reply, InferReply)
    assert (reply.id, reply.model_name) == ("r1", "mlp")
    np.testing.assert_allclose(reply.outputs["y"], _reference(models["mlp"], {"x": x})[0], rtol=1e-5, atol=1e-6)


async def test_reply_echoes_correlation_id_and_id_defaults_to_it(
    amqp_url: str, models: dict[str, Path], rpc: RpcClient, queue: str
) -> None:
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 1, 2, 3]}]})
    async with running_worker(amqp_url, models["affine"], queue):
        message = await rpc.call(queue, Sent(body.encode(), correlation_id="corr-7"))
    assert message.correlation_id == "corr-7"
    assert json.loads(message.body)["id"] == "corr-7"
    assert json.loads(message.body)["outputs"][0]["data"] == [1.0, 3.0, 5.0, 7.0]


async def test_500_concurrent_requests_are_answered_exactly_once_in_real_batches(
    amqp_url: str, models: dict[str, Path], rpc: RpcClient, queue: str
) -> None:
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal((int(rng.integers(1, 4)), 4)).astype(np.float32) for _ in range(500)]
    sent = [
        Sent(encode_request({"x": x}, CONTENT_TYPE_MSGPACK), CONTENT_TYPE_MSGPACK, correlation_id=f"c{i}")
        for i, x in enumerate(inputs)
    ]
    async with running_worker(amqp_url, models["affine"], queue, max_batch=32, prefetch=200) as worker:
        messages = await rpc.call_many(queue, sent)
    # The worker has drained and closed: every reply it will ever send has arrived.
    assert sorted(rpc.replies) == sorted(f"c{i}" for i in range(500))
    assert all(len(replies) == 1 for replies in rpc.replies.values())
    batch_sizes = []
    for x, message in zip(inputs, messages, strict=True):
        reply = decoded(message)
        assert isinstance(reply, InferReply)
        np.testing.assert_allclose(reply.outputs["y"], 2 * x + 1, rtol=1e-6)
        batch_sizes.append(reply.parameters["timing"]["batch_requests"])
    assert np.mean(batch_sizes) > 1, "requests were not batched"
    assert max(r["timing"]["batch_rows"] for r in (decoded(m).parameters for m in messages)) <= 32  # type: ignore[union-attr]
    assert worker.batches_run < 500


async def test_two_inputs_and_two_outputs_of_different_dtypes(
    amqp_url: str, models: dict[str, Path], rpc: RpcClient, queue: str
) -> None:
    a = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    b = np.array([[1, 2], [3, 4]], dtype=np.int64)
    async with running_worker(amqp_url, models["two_io"], queue):
        replies = await rpc.call_many(
            queue,
            [
                Sent(encode_request({"a": a, "b": b}, CONTENT_TYPE_JSON)),
                Sent(encode_request({"a": a, "b": b}, CONTENT_TYPE_MSGPACK, outputs=["b_plus"]), CONTENT_TYPE_MSGPACK),
            ],
        )
    both, only_b = decoded(replies[0]), decoded(replies[1])
    assert isinstance(both, InferReply)
    assert isinstance(only_b, InferReply)
    np.testing.assert_array_equal(both.outputs["sum_a"], [[6.0], [15.0]])
    assert both.outputs["b_plus"].dtype == np.int64
    np.testing.assert_array_equal(both.outputs["b_plus"], b + 10)
    assert list(only_b.outputs) == ["b_plus"]


def _json(inputs: list[dict[str, object]]) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


BAD_REQUESTS = {
    "bad_encoding": Sent(b"{not json"),
    "unsupported_content_type": Sent(b"x=1", content_type="text/plain"),
    "unknown_input": Sent(_json([{"name": "z", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}])),
    "missing_input": Sent(_json([{"name": "a", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}])),
    "wrong_datatype": Sent(
        _json(
            [
                {"name": "a", "datatype": "FP64", "shape": [1, 3], "data": [1, 2, 3]},
                {"name": "b", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]},
            ]
        )
    ),
    "wrong_shape": Sent(
        _json(
            [
                {"name": "a", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
                {"name": "b", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]},
            ]
        )
    ),
    "too_many_rows": Sent(
        _json(
            [
                {"name": "a", "datatype": "FP32", "shape": [9, 3], "data": [0] * 27},
                {"name": "b", "datatype": "INT64", "shape": [9, 2], "data": [0] * 18},
            ]
        )
    ),
    "invalid_tensor": Sent(_json([{"name": "a", "datatype": "FP32", "shape": [2, 3], "data": [1]}])),
    "unknown_output": Sent(
        msgspec.json.encode(
            {
                "inputs": [
                    {"name": "a", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
                    {"name": "b", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]},
                ],
                "outputs": [{"name": "nope"}],
            }
        )
    ),
    "deadline_exceeded": Sent(
        _json(
            [
                {"name": "a", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
                {"name": "b", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]},
            ]
        ),
        headers={"x-deadline-ms": 1_000},
    ),
}


async def test_bad_requests_get_error_replies_and_never_hurt_their_neighbours(
    amqp_url: str, models: dict[str, Path], rpc: RpcClient, queue: str, connection: aio_pika.abc.AbstractConnection
) -> None:
    good = Sent(encode_request({"a": np.ones((1, 3), np.float32), "b": np.ones((1, 2), np.int64)}, CONTENT_TYPE_JSON))
    # Interleave every bad request with good ones, all published before the worker starts,
    # so they land in the same prefetch window and batches.
    channel = await connection.channel()
    from worker.broker import declare_request_queue
    from worker.settings import Settings

    await declare_request_queue(channel, Settings(queue=queue))
    sent: list[tuple[str, Sent]] = []
    for code, bad in BAD_REQUESTS.items():
        sent += [("ok", good), (code, bad), ("ok", good)]
    futures = [await rpc.publish(queue, s) for _, s in sent]
    async with running_worker(amqp_url, models["two_io"], queue, max_batch=8):
        messages = await asyncio.wait_for(asyncio.gather(*futures), 30)
        for (expected, _), message in zip(sent, messages, strict=True):
            reply = decoded(message)
            if expected == "ok":
                assert isinstance(reply, InferReply), reply
                np.testing.assert_array_equal(reply.outputs["sum_a"], [[3.0]])
            else:
                assert isinstance(reply, ErrorReply), expected
                assert reply.code == expected
                assert len(reply.message) > 20
                assert reply.id == message.correlation_id
    # Everything was acked (never requeued): the request queue and the dead-letter queue are empty.
    declared = await channel.declare_queue(queue, passive=True)
    dead = await channel.declare_queue(dead_letter_queue(queue), passive=True)
    assert declared.declaration_result.message_count == 0
    assert dead.declaration_result.message_count == 0
    assert all(len(r) == 1 for r in rpc.replies.values())


async def test_request_without_reply_to_is_dead_lettered(
    amqp_url: str, models: dict[str, Path], rpc: RpcClient, queue: str, connection: aio_pika.abc.AbstractConnection
) -> None:
    channel = await connection.channel()
    dead_letters: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    async with running_worker(amqp_url, models["affine"], queue):
        dlq = await channel.declare_queue(dead_letter_queue(queue), passive=True)
        await dlq.consume(dead_letters.put, no_ack=True)
        body = encode_request({"x": np.zeros((1, 4), np.float32)}, CONTENT_TYPE_JSON)
        await rpc.publish(queue, Sent(body, reply_to=None, correlation_id="orphan"))
        dead = await asyncio.wait_for(dead_letters.get(), 10)
    assert dead.correlation_id == "orphan"
    assert dead.headers["x-death"][0]["reason"] == "rejected"  # type: ignore[index]
