"""Model versions on a real broker: the weighted split, determinism per request id, pinning, weight 0,
a weight changed at run time, and a version removed while its queue holds requests."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import aio_pika.abc
import numpy as np
import pytest

from producer import Client
from producer.amqp.messages import request_message
from producer.amqp.routes import RouteError, declare_route, drain_version, show_route
from producer.bulk.job import BulkJob, BulkOptions, JobFailedError
from producer.wire.errors import PublishRefusedError
from producer.wire.names import dead_letter_queue, model_exchange, results_queue, version_queue
from producer.wire.protocol import encode_request
from tests.support.models import affine_model
from tests.support.worker_process import WorkerProcess
from worker.broker import declare_request_queue
from worker.errors import BrokerRouteError
from worker.settings import Settings

SPLIT_REQUESTS = 2000
SPLIT_TOLERANCE = 0.035


@pytest.fixture(scope="module")
def affine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return affine_model(tmp_path_factory.mktemp("models") / "affine.onnx")


@pytest.fixture
async def model_name(amqp_url: str) -> AsyncIterator[str]:
    """A model name unique to this test; its route and version queues (v1-v3) are deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for version in ("1", "2", "3"):
            queue = version_queue(name, version)
            for q in (queue, dead_letter_queue(queue)):
                await channel.queue_delete(q, if_unused=False, if_empty=False)
        await channel.exchange_delete(model_exchange(name))


async def serve_version(amqp_url: str, model: str, version: str, weight: int) -> None:
    """What a worker of ``version`` does to the broker at start: declare the route and its queue, bind its weight."""
    settings = Settings.from_env({}, amqp_url=amqp_url, model_name=model, model_version=version, traffic_weight=weight)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await declare_request_queue(await connection.channel(), settings)


async def publish_unpinned(channel: aio_pika.abc.AbstractChannel, model: str, ids: list[str]) -> None:
    """Publish one request per id to the model's route, as a client does (correlation_id = request id)."""
    exchange = await channel.get_exchange(model_exchange(model), ensure=False)
    body = encode_request({"x": np.ones((1, 4), np.float32)}, "application/msgpack", request_id="r")
    for request_id in ids:
        message = request_message(
            body, request_id=request_id, content_type="application/msgpack", reply_to="results.split-test", timeout_s=60
        )
        await exchange.publish(message, routing_key="", mandatory=True)


async def depths(channel: aio_pika.abc.AbstractChannel, model: str, versions: tuple[str, ...]) -> dict[str, int]:
    counts = {}
    for version in versions:
        declared = await channel.declare_queue(version_queue(model, version), passive=True)
        counts[version] = declared.declaration_result.message_count or 0
    return counts


async def take_ids(channel: aio_pika.abc.AbstractChannel, model: str, version: str) -> set[str]:
    """Remove every message from the version's queue; their request ids."""
    queue = await channel.declare_queue(version_queue(model, version), passive=True)
    ids = set()
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        ids.add(message.correlation_id or "")
    return ids


async def test_the_route_splits_unpinned_requests_by_weight_and_by_request_id(amqp_url: str, model_name: str) -> None:
    await serve_version(amqp_url, model_name, "1", 90)
    await serve_version(amqp_url, model_name, "2", 10)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        ids = [uuid.uuid4().hex for _ in range(SPLIT_REQUESTS)]
        await publish_unpinned(channel, model_name, ids)
        counts = await depths(channel, model_name, ("1", "2"))
        share = counts["2"] / SPLIT_REQUESTS
        print(f"90/10: {counts} -> version 2 share {share:.2%}")
        assert sum(counts.values()) == SPLIT_REQUESTS
        assert abs(share - 0.10) <= SPLIT_TOLERANCE

        first = {v: await take_ids(channel, model_name, v) for v in ("1", "2")}
        await publish_unpinned(channel, model_name, ids)  # the same ids again: a retry of each
        again = {v: await take_ids(channel, model_name, v) for v in ("1", "2")}
        assert again == first, "a request id must land on the same version every time"

        # The weight changes while this publisher stays connected: version 2 restarts at 50.
        await serve_version(amqp_url, model_name, "2", 50)
        await publish_unpinned(channel, model_name, [uuid.uuid4().hex for _ in range(SPLIT_REQUESTS)])
        counts = await depths(channel, model_name, ("1", "2"))
        share = counts["2"] / SPLIT_REQUESTS
        print(f"90/50: {counts} -> version 2 share {share:.2%}")
        assert abs(share - 50 / 140) <= SPLIT_TOLERANCE


async def test_a_version_at_weight_0_takes_no_unpinned_requests(amqp_url: str, model_name: str) -> None:
    await serve_version(amqp_url, model_name, "1", 90)
    await serve_version(amqp_url, model_name, "2", 10)
    await serve_version(amqp_url, model_name, "2", 0)  # moved to 0: unbound
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await publish_unpinned(channel, model_name, [uuid.uuid4().hex for _ in range(200)])
        assert await depths(channel, model_name, ("1", "2")) == {"1": 200, "2": 0}
        states = await show_route(amqp_url, model_name)
        assert [(s.version, s.weight, s.ready) for s in states] == [("1", 90, 200), ("2", 0, 0)]


async def test_a_worker_refuses_a_broker_without_the_exchange_type(amqp_url: str, model_name: str) -> None:
    # A broker without the plugin answers an unknown exchange type exactly as it does for this one.
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        with pytest.raises(RouteError, match="rabbitmq-plugins enable rabbitmq_consistent_hash_exchange"):
            await declare_route(await connection.channel(), model_name, exchange_type="x-no-such-exchange-type")


async def test_a_worker_refuses_a_route_name_taken_by_another_exchange(amqp_url: str, model_name: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(model_exchange(model_name), "direct", durable=True)
        settings = Settings.from_env({}, amqp_url=amqp_url, model_name=model_name, model_version="1", traffic_weight=1)
        with pytest.raises(BrokerRouteError, match="exists with another type"):
            await declare_request_queue(await connection.channel(), settings)


def start_version(amqp_url: str, model: Path, name: str, version: str, weight: int) -> WorkerProcess:
    return WorkerProcess(
        amqp_url,
        model,
        "unused",
        "--model-name",
        name,
        "--model-version",
        version,
        "--traffic-weight",
        str(weight),
        name=f"worker v{version}",
    )


@pytest.fixture
def versions(amqp_url: str, affine: Path, model_name: str) -> Iterator[dict[str, WorkerProcess]]:
    """Worker processes for versions 1 (weight 90), 2 (weight 10) and 3 (weight 0) of ``model_name``."""
    workers = {v: start_version(amqp_url, affine, model_name, v, w) for v, w in (("1", 90), ("2", 10), ("3", 0))}
    try:
        for worker in workers.values():
            worker.start()
        for worker in workers.values():
            worker.wait_ready()
        yield workers
    finally:
        for worker in workers.values():
            worker.stop()


async def test_clients_reach_versions_by_weight_by_pin_and_by_request_id(
    amqp_url: str, model_name: str, versions: dict[str, WorkerProcess]
) -> None:
    x = np.ones((1, 4), np.float32)
    async with Client(amqp_url, model=model_name, timeout_s=30) as client:
        unpinned = await asyncio.gather(*(client.infer({"x": x}) for _ in range(300)))
        answered = {r.model_version for r in unpinned}
        assert answered <= {"1", "2"}, "version 3 has weight 0: it takes no unpinned request"
        np.testing.assert_allclose(unpinned[0].outputs["y"], 2 * x + 1)

        for version in ("1", "2", "3"):
            pinned = await asyncio.gather(*(client.infer({"x": x}, version=version) for _ in range(100)))
            assert {r.model_version for r in pinned} == {version}

        ids = [uuid.uuid4().hex for _ in range(100)]
        first = await asyncio.gather(*(client.infer({"x": x}, request_id=i) for i in ids))
        again = await asyncio.gather(*(client.infer({"x": x}, request_id=i) for i in ids))
        assert [r.model_version for r in first] == [r.model_version for r in again]

    async with Client(amqp_url, model=model_name, version="2", timeout_s=30) as pinned_client:
        replies = await asyncio.gather(*(pinned_client.infer({"x": x}) for _ in range(50)))
        assert {r.model_version for r in replies} == {"2"}
        with pytest.raises(PublishRefusedError, match="no version"):
            await pinned_client.infer({"x": x}, version="9")


async def test_a_removed_version_loses_no_request(
    amqp_url: str, model_name: str, versions: dict[str, WorkerProcess]
) -> None:
    x = np.ones((1, 4), np.float32)
    assert versions["2"].stop() == 0  # version 2's release is uninstalled; its queue stays on the broker
    async with Client(amqp_url, model=model_name, timeout_s=60, coalesce_rows=1) as client:
        calls = [asyncio.ensure_future(client.infer({"x": x}, version="2")) for _ in range(40)]
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            for _ in range(200):  # the pinned requests wait there once published (polled: no event says so)
                if (await depths(channel, model_name, ("2",)))["2"] >= 40:
                    break
                await asyncio.sleep(0.05)
        # Version 2 keeps its weight until drained: its share of these waits there too.
        calls += [asyncio.ensure_future(client.infer({"x": x}, request_id=uuid.uuid4().hex)) for _ in range(400)]
        stranded = (await show_route(amqp_url, model_name))[1]
        assert (stranded.version, stranded.consumers) == ("2", 0)
        assert stranded.ready >= 40

        moved = await drain_version(amqp_url, model_name, "2")
        replies = await asyncio.gather(*calls)
        assert len(replies) == 440
        assert moved >= 40
        assert {r.model_version for r in replies} <= {"1"}, "version 3 is at weight 0, version 2 is gone"
        with pytest.raises(PublishRefusedError, match="no version"):
            await client.infer({"x": x}, version="2")
        states = await show_route(amqp_url, model_name)
        assert [s.version for s in states] == ["1", "3"]


def write_rows(path: Path, rows: int) -> None:
    path.write_text("".join(json.dumps({"id": f"r{i}", "inputs": {"x": [i, i, i, i]}}) + "\n" for i in range(rows)))


async def test_a_bulk_job_is_pinned_to_one_version(
    amqp_url: str, model_name: str, versions: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    write_rows(tmp_path / "in.jsonl", 500)
    job_ids = [f"job-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    try:
        unpinned = BulkOptions(
            input_path=tmp_path / "in.jsonl",
            output_path=tmp_path / "first.jsonl",
            model=model_name,
            job_id=job_ids[0],
            amqp_url=amqp_url,
            rows_per_message=8,
        )
        summary = await BulkJob(unpinned).run()
        assert (summary.written, summary.failed, summary.other_version) == (500, 0, 0)
        assert summary.model_version in {"1", "2"}, "the first reply's version, and every reply from it"
        with pytest.raises(JobFailedError, match=f"pinned to version {summary.model_version}"):
            await BulkJob(dataclasses.replace(unpinned, version="3")).run()

        # Version 3 takes no unpinned traffic: a job pinned to it is answered by it alone.
        pinned = dataclasses.replace(unpinned, output_path=tmp_path / "v3.jsonl", job_id=job_ids[1], version="3")
        summary = await BulkJob(pinned).run()
        assert (summary.written, summary.failed, summary.other_version, summary.model_version) == (500, 0, 0, "3")
    finally:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            for job_id in job_ids:
                await channel.queue_delete(results_queue(job_id), if_unused=False, if_empty=False)


async def test_a_worker_process_that_cannot_join_its_route_exits_saying_why(
    amqp_url: str, affine: Path, model_name: str
) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(model_exchange(model_name), "direct", durable=True)
    worker = start_version(amqp_url, affine, model_name, "1", 10)
    worker.start()
    try:
        assert await worker.wait_async(60) == 1
        failed = worker.events("worker_failed")
        assert failed, worker.log_tail()
        assert "exists with another type" in failed[0]["error"]
    finally:
        await worker.stop_async()
