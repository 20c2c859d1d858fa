"""Client-side coalescing against a real broker and real worker processes: each caller gets exactly its own rows."""

from __future__ import annotations

import asyncio
import signal
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import numpy as np
import pytest

from producer import Client, SyncClient
from producer.wire.errors import ErrorReplyError, RequestTimeoutError
from producer.wire.names import dead_letter_queue, request_queue_arguments
from tests.support.faults import paused, wait_for_ready
from tests.support.models import TEXT_WORDS, affine_model, text_model_folder
from tests.support.worker_process import WorkerProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def affine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return affine_model(tmp_path_factory.mktemp("models") / "affine.onnx")


@pytest.fixture
async def affine_worker(amqp_url: str, affine: Path, queue: str) -> AsyncIterator[str]:
    async with WorkerProcess(amqp_url, affine, queue):
        yield queue


def _row(i: int) -> np.ndarray:
    return np.array([[i, -i, 0.5 * i, 1.0]], dtype=np.float32)


async def test_256_concurrent_single_row_calls_each_get_exactly_their_own_row(
    amqp_url: str, affine_worker: str
) -> None:
    async with Client(amqp_url, queue=affine_worker, timeout_s=60, coalesce_rows=64) as client:
        replies = await asyncio.gather(*(client.infer({"x": _row(i)}, request_id=f"r{i}") for i in range(256)))
    for i, reply in enumerate(replies):
        assert reply.id == f"r{i}"
        np.testing.assert_array_equal(reply.outputs["y"], 2 * _row(i) + 1)
    packed = [r.parameters.get("coalesced", {}).get("requests", 1) for r in replies]
    assert max(packed) > 1, "no call was packed with another"
    assert max(r.parameters["coalesced"]["rows"] for r in replies if "coalesced" in r.parameters) <= 64


async def test_with_coalescing_off_every_call_is_its_own_request(amqp_url: str, affine_worker: str) -> None:
    async with Client(amqp_url, queue=affine_worker, timeout_s=60, coalesce_rows=1) as client:
        replies = await asyncio.gather(*(client.infer({"x": _row(i)}) for i in range(32)))
    assert all("coalesced" not in r.parameters for r in replies)


async def test_a_bad_row_fails_only_its_own_caller(amqp_url: str, tmp_path: Path, queue: str) -> None:
    folder = text_model_folder(tmp_path / "tiny-text")
    good = [" ".join(TEXT_WORDS[i % len(TEXT_WORDS)] for i in range(k, k + 3)) for k in range(40)]
    too_long = " ".join(TEXT_WORDS) * 4  # over --max-text-bytes 64: refused for that row only
    async with (
        WorkerProcess(amqp_url, folder, queue, "--max-text-bytes", "64") as worker,
        Client(amqp_url, queue=queue, timeout_s=60, coalesce_rows=64) as client,
    ):
        calls = [client.infer_text([text]) for text in good[:20]]
        calls.append(client.infer_text([too_long]))
        calls += [client.infer_text([text]) for text in good[20:]]
        results = await asyncio.gather(*calls, return_exceptions=True)
    refused = [e for e in worker.events("bad_request") if e.get("code") == "text_too_long"]
    assert len(refused) == 2, "the bad row should fail its packed request once, then alone once"
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1
    assert isinstance(errors[0], ErrorReplyError)
    assert errors[0].code == "text_too_long"
    assert results[20] is errors[0]
    assert all(r.outputs["embedding"].shape == (1, 4) for r in results if not isinstance(r, BaseException))


async def test_a_timeout_fails_exactly_the_callers_it_concerns(
    amqp_url: str, affine: Path, queue: str, connection: aio_pika.abc.AbstractConnection
) -> None:
    channel = await connection.channel()
    await channel.declare_queue(dead_letter_queue(queue), durable=True, arguments={"x-queue-type": "quorum"})
    await channel.declare_queue(queue, durable=True, arguments=request_queue_arguments(queue))
    async with Client(amqp_url, queue=queue, coalesce_rows=64) as client:
        short = [asyncio.ensure_future(client.infer({"x": _row(i)}, timeout_s=0.3)) for i in range(10)]
        long = [asyncio.ensure_future(client.infer({"x": _row(i)}, timeout_s=60)) for i in range(10, 20)]
        short_results = await asyncio.gather(*short, return_exceptions=True)
        assert all(isinstance(r, RequestTimeoutError) for r in short_results)
        assert not any(f.done() for f in long)
        async with WorkerProcess(amqp_url, affine, queue):
            long_results = await asyncio.gather(*long)
    for i, reply in enumerate(long_results, start=10):
        np.testing.assert_array_equal(reply.outputs["y"], 2 * _row(i) + 1)


def test_sync_client_calls_from_many_threads_are_packed_and_answered_each_with_its_own_row(
    amqp_url: str, affine: Path
) -> None:
    queue = f"test.coalesce.sync.{uuid.uuid4().hex[:8]}"
    results: dict[int, np.ndarray] = {}
    with WorkerProcess(amqp_url, affine, queue), SyncClient(amqp_url, queue=queue, timeout_s=60) as client:

        def call(i: int) -> None:
            results[i] = client.infer({"x": _row(i)}).outputs["y"]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    asyncio.run(_delete(amqp_url, queue))
    assert sorted(results) == list(range(32))
    for i, y in results.items():
        np.testing.assert_array_equal(y, 2 * _row(i) + 1)


async def _delete(amqp_url: str, queue: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in (queue, dead_letter_queue(queue)):
            await channel.queue_delete(name, if_unused=False, if_empty=False)


async def test_a_worker_killed_under_packed_load_costs_no_caller_its_own_answer(
    amqp_url: str, affine: Path, queue: str
) -> None:
    async def call(client: Client, i: int) -> np.ndarray:
        reply = await client.infer({"x": _row(i)})
        return np.asarray(reply.outputs["y"])

    async with (
        WorkerProcess(amqp_url, affine, queue, "--max-batch", "16") as first,
        WorkerProcess(amqp_url, affine, queue, "--max-batch", "16") as second,
        Client(amqp_url, queue=queue, timeout_s=60, coalesce_rows=16) as client,
    ):
        assert first.pid is not None
        assert second.pid is not None
        async with paused([first.pid, second.pid]):
            calls = [asyncio.ensure_future(call(client, i)) for i in range(2000)]
            # Both workers are stopped with the window a fresh worker starts with, one delivery: once packed
            # requests wait in the queue, each holds one it has not answered (observed, not guessed).
            await wait_for_ready(amqp_url, queue, at_least=2)
            first.signal(signal.SIGKILL)  # its unacked packed request goes to the other worker
        results = await asyncio.gather(*calls)
    assert len(second.events("redelivered")) >= 1, "the packed request the killed worker held was not redelivered"
    for i, y in enumerate(results):
        np.testing.assert_array_equal(y, 2 * _row(i) + 1)
