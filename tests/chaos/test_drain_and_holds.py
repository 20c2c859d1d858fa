"""What the fault matrix cannot time deterministically from outside a process: readiness during a
drain, and the ack ledger around a held reply."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import numpy as np
import pytest

from producer.wire.names import CONTENT_TYPE_MSGPACK
from producer.wire.protocol import InferReply, InferRequest, encode_request
from tests.support.models import affine_model
from tests.support.workers import RpcClient, Sent, decoded
from worker.acks import AckLedger, reply_retry_delay_s
from worker.pipelines.tensor import load_pipeline
from worker.service import Worker
from worker.settings import Settings


class GatedPipeline:
    """A real pipeline whose runs wait for ``gate``, so a test decides when a batch finishes."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.gate = threading.Event()
        self.running = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def batch_key(self, request: InferRequest) -> Hashable:
        return self._inner.batch_key(request)

    def warm_up(self, max_rows: int) -> None:
        self._inner.warm_up(max_rows)
        # Stand in for a model slower than the worker's inline threshold, so its runs go to the
        # model thread, where the test can hold one without blocking the event loop.
        time.sleep(0.005)

    def run(self, requests: Sequence[InferRequest]) -> Any:
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("the model ran on the event loop thread; holding it would block the loop")
        self.running.set()
        self.gate.wait(30)
        return self._inner.run(requests)


@pytest.mark.integration
async def test_readiness_is_false_from_the_start_of_a_drain_and_the_computing_batch_is_answered(
    amqp_url: str,
    tmp_path: Path,
    queue: str,
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    settings = Settings(amqp_url=amqp_url, model=affine_model(tmp_path / "affine.onnx"), queue=queue, http_port=0)
    pipeline = GatedPipeline(load_pipeline(settings.model_config))
    pipeline.gate.set()  # let the warm-up through
    worker = Worker(settings, pipeline, install_signal_handlers=False)  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.consuming_event.wait(), 30)
    assert worker.health.ready
    pipeline.gate.clear()
    pipeline.running.clear()
    rpc = await RpcClient.open(connection)
    body = encode_request({"x": np.ones((1, 4), np.float32)}, CONTENT_TYPE_MSGPACK)
    reply = await rpc.publish(queue, Sent(body, CONTENT_TYPE_MSGPACK))
    await asyncio.to_thread(pipeline.running.wait, 30)  # the batch is computing now
    worker.stop_event.set()  # what SIGTERM does
    for _ in range(1000):  # the drain starts within a few turns of the event loop, with no I/O
        if worker.health.draining:
            break
        await asyncio.sleep(0)
    assert worker.health.draining, "the drain had not begun while the batch was computing"
    assert not worker.health.ready
    pipeline.gate.set()
    await asyncio.wait_for(task, 30)
    answer = decoded(await asyncio.wait_for(reply, 10))
    assert isinstance(answer, InferReply)
    np.testing.assert_array_equal(answer.outputs["y"], np.full((1, 4), 3.0, np.float32))
    declared = await (await connection.channel()).declare_queue(queue, passive=True)
    assert declared.declaration_result.message_count == 0  # acked, not handed back


@pytest.mark.integration
async def test_a_drain_hands_back_a_request_whose_rows_still_wait_even_when_some_are_computing(
    amqp_url: str,
    tmp_path: Path,
    queue: str,
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    model = affine_model(tmp_path / "affine.onnx")
    # Batches of 4 rows, and the worker waits for a full one: requests A, B, C of 3 rows each make the
    # batches [A, B's first row] and [B's last two rows, C's first two rows]; C's last row waits.
    settings = Settings(amqp_url=amqp_url, model=model, queue=queue, http_port=0, max_batch=4, max_delay_ms=10000)
    pipeline = GatedPipeline(load_pipeline(settings.model_config))
    pipeline.gate.set()
    worker = Worker(settings, pipeline, install_signal_handlers=False)  # type: ignore[arg-type]
    submitted = asyncio.Event()
    batches: list[list[int]] = []
    submit = worker._runner.submit

    def counting_submit(run: Any, parts: Any) -> Any:
        batches.append([part.rows for part in parts])
        if len(batches) == 2:
            submitted.set()
        return submit(run, parts)

    worker._runner.submit = counting_submit  # type: ignore[method-assign]
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.consuming_event.wait(), 30)
    pipeline.gate.clear()  # every model run waits for the test from now on
    rpc = await RpcClient.open(connection)
    body = encode_request({"x": np.ones((3, 4), np.float32)}, CONTENT_TYPE_MSGPACK)
    replies = {name: await rpc.publish(queue, Sent(body, CONTENT_TYPE_MSGPACK, correlation_id=name)) for name in "abc"}
    await asyncio.wait_for(submitted.wait(), 30)
    worker.stop_event.set()
    for _ in range(1000):  # the drain starts within a few turns of the event loop, with no I/O
        if worker.health.draining:
            break
        await asyncio.sleep(0)
    assert worker.health.draining, "the drain had not begun when the held batches were let go"
    pipeline.gate.set()
    await asyncio.wait_for(task, 30)
    assert batches == [[3, 1], [2, 2]]
    for name in "ab":  # every row was computing when the drain began: answered
        answer = decoded(await asyncio.wait_for(replies[name], 10))
        assert isinstance(answer, InferReply)
        np.testing.assert_array_equal(answer.outputs["y"], np.full((3, 4), 3.0, np.float32))
    assert "c" not in rpc.replies, "a handed-back request is not answered, though two of its rows were computed"
    declared = await (await connection.channel()).declare_queue(queue, passive=True)
    assert declared.declaration_result.message_count == 1  # C, handed back whole


def test_ledger_acks_around_a_held_tag_one_by_one_and_never_covers_it() -> None:
    ledger = AckLedger()
    for tag in (1, 2, 3, 4, 5):
        ledger.add(tag)
    ledger.hold(1)
    assert ledger.settle([2, 3]) is None  # 1 is held: no multiple-ack may cover it
    assert ledger.take_singles() == [2, 3]
    assert ledger.settle([5]) is None
    assert ledger.take_singles() == []  # 4 is still being worked on, and holds 5 back as usual
    assert ledger.settle([4]) is None
    assert ledger.take_singles() == [4, 5]
    ledger.release(1)
    assert ledger.settle([1]) == 1
    assert len(ledger) == 0


def test_refused_replies_are_retried_with_a_gentle_bounded_backoff() -> None:
    delays = [reply_retry_delay_s(attempt) for attempt in range(10)]
    assert delays == sorted(delays)
    assert delays[0] > 0
    assert max(delays) <= 2.0
