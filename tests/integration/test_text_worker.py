"""The default text model served by a real worker through RabbitMQ equals sentence-transformers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aio_pika
import numpy as np
import pytest

from producer.wire.names import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK
from producer.wire.protocol import ErrorReply, InferReply, encode_request
from tests.integration.test_minilm_reference import (  # noqa: F401  (fixtures)
    MIN_COSINE,
    SENTENCES,
    cosines,
    minilm_folder,
    reference,
)
from tests.support.workers import RpcClient, Sent, decoded, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_worker_embeddings_equal_sentence_transformers_alone_and_batched(
    amqp_url: str,
    minilm_folder: Path,  # noqa: F811
    reference: np.ndarray,  # noqa: F811
    connection: aio_pika.abc.AbstractConnection,
    queue: str,
) -> None:
    rpc = await RpcClient.open(connection)
    one_each = [Sent(encode_request({"text": [s]}, CONTENT_TYPE_MSGPACK), CONTENT_TYPE_MSGPACK) for s in SENTENCES]
    all_rows = Sent(encode_request({"text": SENTENCES}, CONTENT_TYPE_JSON))
    async with running_worker(amqp_url, minilm_folder, queue, max_batch=16) as worker:
        messages = await rpc.call_many(queue, [*one_each, all_rows], timeout_s=120)
    singles = [decoded(m) for m in messages[:-1]]
    together = decoded(messages[-1])
    assert all(isinstance(r, InferReply) for r in [*singles, together])
    got_single = np.concatenate([r.outputs["embedding"] for r in singles])  # type: ignore[union-attr]
    got_together = together.outputs["embedding"]  # type: ignore[union-attr]
    assert got_together.shape == (len(SENTENCES), 384)
    assert got_together.dtype == np.float32
    for got in (got_single, got_together):
        per_row = cosines(got, reference)
        worst = int(np.argmin(per_row))
        assert per_row.min() >= MIN_COSINE, f"row {worst} ({SENTENCES[worst][:40]!r}): cosine {per_row[worst]:.6f}"
    assert worker.batches_run < len(SENTENCES) + 1, "single-text requests were never batched"


def _text_request(datatype: str, shape: list[int], data: list[object]) -> bytes:
    return json.dumps({"inputs": [{"name": "text", "datatype": datatype, "shape": shape, "data": data}]}).encode()


async def test_bad_text_requests_get_clear_error_replies(
    amqp_url: str,
    minilm_folder: Path,  # noqa: F811
    connection: aio_pika.abc.AbstractConnection,
    queue: str,
) -> None:
    rpc = await RpcClient.open(connection)
    cases = {
        "invalid_tensor": _text_request("BYTES", [2], ["fine", 7]),
        "wrong_datatype": _text_request("FP32", [2], [1.0, 2.0]),
        "wrong_shape": _text_request("BYTES", [1, 2], ["a", "b"]),
        "too_many_rows": _text_request("BYTES", [5], ["a"] * 5),
        "unknown_input": json.dumps(
            {"inputs": [{"name": "sentence", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}
        ).encode(),
    }
    async with running_worker(amqp_url, minilm_folder, queue, max_batch=4):
        messages = await rpc.call_many(queue, [Sent(body) for body in cases.values()], timeout_s=60)
    for expected, message in zip(cases, messages, strict=True):
        reply = decoded(message)
        assert isinstance(reply, ErrorReply), expected
        assert reply.code == expected, reply.message
        assert "text" in reply.message or "row" in reply.message


async def test_a_10_mb_text_is_refused_before_tokenizing_while_its_neighbours_are_embedded(
    amqp_url: str,
    minilm_folder: Path,  # noqa: F811
    connection: aio_pika.abc.AbstractConnection,
    queue: str,
) -> None:
    rpc = await RpcClient.open(connection)
    huge = Sent(encode_request({"text": ["word " * 2_000_000]}, CONTENT_TYPE_MSGPACK), CONTENT_TYPE_MSGPACK)
    neighbours = [Sent(encode_request({"text": [s]}, CONTENT_TYPE_MSGPACK), CONTENT_TYPE_MSGPACK) for s in SENTENCES]
    async with running_worker(amqp_url, minilm_folder, queue, max_batch=16) as worker:
        pending = await rpc.publish(queue, huge)
        answers = await rpc.call_many(queue, neighbours, timeout_s=60)
        refused = decoded(await asyncio.wait_for(pending, 60))
        rows_run = worker.rows_run
    assert isinstance(refused, ErrorReply)
    assert refused.code == "text_too_long"
    assert "WORKER_MAX_TEXT_BYTES" in refused.message
    assert all(isinstance(decoded(m), InferReply) for m in answers)
    assert rows_run == len(SENTENCES)  # the refused text never reached the model
