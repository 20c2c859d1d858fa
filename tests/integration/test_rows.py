"""Row-level scheduling through a real worker and broker: a request's rows ride in several model runs
beside other requests' rows, and the request still gets one reply, in row order, or one error."""

from __future__ import annotations

from pathlib import Path

import aio_pika
import numpy as np
import pytest

from producer.wire.names import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, dead_letter_queue
from producer.wire.protocol import ErrorReply, InferReply, InferRequest, encode_request
from tests.chaos.models import POISON_VALUE, poison_model
from tests.support.models import TEXT_WORDS, text_model_folder
from tests.support.workers import RpcClient, Sent, decoded, running_worker
from worker.broker import declare_request_queue
from worker.pipelines.tensor import load_pipeline
from worker.settings import Settings

pytestmark = pytest.mark.integration

REQUESTS = 10
ROWS = 5  # per request; batches of 8 rows cannot hold whole requests side by side
MAX_BATCH = 8
LINGER_MS = 500  # the worker waits for a full batch, so batches mix requests whatever the arrival timing


async def _publish_then_serve(
    amqp_url: str,
    model: Path,
    queue: str,
    connection: aio_pika.abc.AbstractConnection,
    sent: list[Sent],
    **settings: object,
) -> list[InferReply | ErrorReply]:
    """Publish every request before the worker starts, so they share its window and batches."""
    channel = await connection.channel()
    await declare_request_queue(channel, Settings(queue=queue))
    rpc = await RpcClient.open(connection)
    futures = [await rpc.publish(queue, s) for s in sent]
    async with running_worker(amqp_url, model, queue, max_batch=MAX_BATCH, max_delay_ms=LINGER_MS, **settings):
        messages = [await f for f in futures]
    declared = await channel.declare_queue(queue, passive=True)
    dead = await channel.declare_queue(dead_letter_queue(queue), passive=True)
    assert declared.declaration_result.message_count == 0
    assert dead.declaration_result.message_count == 0
    assert all(len(r) == 1 for r in rpc.replies.values()), "one reply per request"
    return [decoded(m) for m in messages]


@pytest.mark.parametrize("schedule", ["rows", "requests"])
async def test_a_failing_row_fails_only_its_request_and_the_others_come_back_whole_in_row_order(
    amqp_url: str, tmp_path: Path, queue: str, connection: aio_pika.abc.AbstractConnection, schedule: str
) -> None:
    model = poison_model(tmp_path / "poison.onnx")
    rng = np.random.default_rng(3)
    inputs = [rng.random((ROWS, 4), dtype=np.float32) for _ in range(REQUESTS)]
    inputs[4][3, 0] = POISON_VALUE  # one row of one request makes the model raise
    sent = [
        Sent(encode_request({"x": x}, CONTENT_TYPE_MSGPACK), CONTENT_TYPE_MSGPACK, correlation_id=f"r{i}")
        for i, x in enumerate(inputs)
    ]
    replies = await _publish_then_serve(amqp_url, model, queue, connection, sent, schedule=schedule)
    for i, (x, reply) in enumerate(zip(inputs, replies, strict=True)):
        if i == 4:
            assert isinstance(reply, ErrorReply)
            assert reply.code == "inference_failed"
            continue
        assert isinstance(reply, InferReply), (i, reply)
        np.testing.assert_array_equal(reply.outputs["y"], 2 * x + 1)
    runs = [r.parameters["timing"]["runs"] for r in replies if isinstance(r, InferReply)]
    if schedule == "rows":
        assert max(runs) >= 2, "no request lent its first rows to a fuller batch"
    else:
        assert set(runs) == {1}


async def test_texts_of_many_packed_requests_share_runs_and_each_request_equals_its_rows_alone(
    amqp_url: str, tmp_path: Path, queue: str, connection: aio_pika.abc.AbstractConnection
) -> None:
    folder = text_model_folder(tmp_path / "text")
    rng = np.random.default_rng(5)
    packed = [
        [" ".join(rng.choice(TEXT_WORDS, size=int(rng.choice([1, 2, 9])))) for _ in range(ROWS)]
        for _ in range(REQUESTS)
    ]
    sent = [Sent(encode_request({"text": texts}, CONTENT_TYPE_JSON)) for texts in packed]
    replies = await _publish_then_serve(amqp_url, folder, queue, connection, sent)
    pipeline = load_pipeline(Settings(model=folder).model_config)
    for texts, reply in zip(packed, replies, strict=True):
        assert isinstance(reply, InferReply), reply
        request = InferRequest(id="", inputs={"text": np.array(texts, dtype=object)})
        [alone] = pipeline.run([pipeline.prepare(request, max_rows=MAX_BATCH)])
        np.testing.assert_allclose(reply.outputs["embedding"], alone["embedding"], rtol=1e-5, atol=1e-6)
    timings = [r.parameters["timing"] for r in replies if isinstance(r, InferReply)]
    assert max(t["batch_requests"] for t in timings) >= 2, "rows of different requests never shared a run"
    assert max(t["runs"] for t in timings) >= 2, "no request's rows were spread over runs"
