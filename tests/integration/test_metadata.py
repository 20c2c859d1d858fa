"""Model metadata over the queue, on a real broker with real workers: the OIP shape, no model run, settled
like any request (acked, never requeued), bounded, and per version over a model's route."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import aiormq.exceptions
import msgspec
import pytest

from producer import Client, PublishRefusedError
from producer.wire.names import (
    CONSISTENT_HASH_PLUGIN,
    HEADER_KIND,
    KIND_METADATA,
    MODEL_ROUTE_EXCHANGE_TYPE,
    dead_letter_queue,
    model_exchange,
    version_queue,
)
from producer.wire.protocol import decode_reply
from tests.support.models import mlp_model, text_model_folder
from tests.support.worker_process import REPO_ROOT, child_env
from tests.support.workers import RpcClient, Sent, running_worker
from worker.pipelines.tensor import load_pipeline
from worker.settings import Settings

pytestmark = pytest.mark.integration

DEFAULT_MODEL = REPO_ROOT / "models" / "all-MiniLM-L6-v2"


class CountingPipeline:
    """A loaded pipeline that counts its model runs (every other attribute is the pipeline's own)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.runs = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def run(self, prepared: Sequence[Any]) -> list[Any]:
        self.runs += 1
        return list(self._inner.run(prepared))


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    return mlp_model(tmp_path / "mlp.onnx", width=16, hidden=8, layers=2)


def _as_dict(metadata: Any) -> dict[str, Any]:
    return json.loads(msgspec.json.encode(metadata))


async def test_a_worker_answers_a_metadata_request_with_the_oip_shape_and_no_model_run(
    amqp_url: str, mlp: Path, queue: str, connection: aio_pika.abc.AbstractConnection
) -> None:
    settings = Settings(amqp_url=amqp_url, model=mlp, queue=queue, max_batch=32)
    pipeline = CountingPipeline(load_pipeline(settings.model_config))
    async with running_worker(amqp_url, mlp, queue, pipeline=pipeline, max_batch=32):
        async with Client(amqp_url, queue=queue, timeout_s=20) as client:
            metadata = _as_dict(await client.metadata())
        rpc = await RpcClient.open(connection)
        raw = await rpc.call(queue, Sent(b"", correlation_id="meta-1", headers={HEADER_KIND: KIND_METADATA}))
    print("\nmetadata reply (tiny MLP):", json.dumps(metadata))
    assert metadata == {
        "name": "mlp",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 8]}],
        "parameters": {
            "max_batch_rows": 32,
            "max_message_bytes": settings.max_message_bytes,
            "providers": pipeline.providers,
        },
    }
    assert raw.correlation_id == "meta-1"
    assert raw.content_type == "application/json"
    assert json.loads(raw.body) == metadata  # the same answer in JSON to a JSON (here: untyped) request
    assert pipeline.runs == 0, "a metadata request must not run the model"
    # Settled like any request: acked once answered, so nothing is left for the broker to requeue.
    channel = await connection.channel()
    declared = await channel.declare_queue(queue, passive=True)
    assert declared.declaration_result.message_count == 0
    assert len(rpc.replies["meta-1"]) == 1


async def test_a_metadata_request_with_a_body_over_the_bound_gets_message_too_large(
    amqp_url: str, mlp: Path, queue: str, connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_worker(amqp_url, mlp, queue):
        rpc = await RpcClient.open(connection)
        raw = await rpc.call(queue, Sent(b"x" * 4096, correlation_id="meta-big", headers={HEADER_KIND: KIND_METADATA}))
        async with Client(amqp_url, queue=queue, timeout_s=20) as client:
            assert (await client.metadata()).name == "mlp"  # the worker goes on answering
    reply = decode_reply(raw.body, raw.content_type)
    assert raw.correlation_id == "meta-big"
    assert getattr(reply, "code", None) == "message_too_large"
    assert "a metadata request carries no body" in getattr(reply, "message", "")


@pytest.mark.skipif(not (DEFAULT_MODEL / "model.json").is_file(), reason="no default model: run `make model`")
async def test_the_default_model_answers_text_in_and_embedding_out_with_its_text_limits(
    amqp_url: str, queue: str
) -> None:
    async with running_worker(amqp_url, DEFAULT_MODEL, queue), Client(amqp_url, queue=queue) as client:
        metadata = _as_dict(await client.metadata(timeout_s=20))
    print("\nmetadata reply (default model):", json.dumps(metadata))
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert metadata["parameters"]["max_batch_rows"] == 64
    assert metadata["parameters"]["max_text_bytes"] == 65536
    assert metadata["parameters"]["max_text_tokens"] == 256


@pytest.fixture
async def model_name(amqp_url: str) -> AsyncIterator[str]:
    """A model name unique to this test; its route and version queues (v1, v2) are deleted afterwards."""
    name = f"test-meta-{uuid.uuid4().hex[:8]}"
    yield name
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for version in ("1", "2"):
            queue = version_queue(name, version)
            for q in (queue, dead_letter_queue(queue)):
                await channel.queue_delete(q, if_unused=False, if_empty=False)
        await channel.exchange_delete(model_exchange(name))


async def _producer(amqp_url: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "producer.cli", "metadata", *args, "--timeout-s", "20",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=child_env(amqp_url), cwd=REPO_ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def routes(amqp_url: str) -> None:
    """Skip (fail under ``CI=true``) when the broker has no consistent-hash exchange type, which routes need."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        try:
            exchange = await (await connection.channel()).declare_exchange(
                f"test.meta-probe.{uuid.uuid4().hex[:8]}", MODEL_ROUTE_EXCHANGE_TYPE, auto_delete=True
            )
            await exchange.delete()
            return
        except aiormq.exceptions.ConnectionCommandInvalid:
            pass
    reason = f"the broker lacks the {CONSISTENT_HASH_PLUGIN} plugin that model routes need"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.mark.usefixtures("routes")
async def test_metadata_over_a_model_route_names_the_version_that_answered(
    amqp_url: str, tmp_path: Path, model_name: str
) -> None:
    folder = text_model_folder(tmp_path / "text")  # its manifest says version "1": a routed worker's own wins
    route = {"model_name": model_name}
    async with (
        running_worker(amqp_url, folder, "unused", model_version="1", traffic_weight=0, **route),
        running_worker(amqp_url, folder, "unused", model_version="2", traffic_weight=10, **route),
    ):
        async with Client(amqp_url, model=model_name, timeout_s=20) as client:
            pinned = {v: await client.metadata(version=v) for v in ("1", "2")}
            unpinned = await client.metadata()  # version 1 has weight 0: version 2 takes every unpinned request
        code, out, err = await _producer(amqp_url, "--model", model_name, "--version", "2")
        queue_code, queue_out, _ = await _producer(amqp_url, "--queue", version_queue(model_name, "1"))
    assert {v: m.versions for v, m in pinned.items()} == {"1": ["1"], "2": ["2"]}
    assert unpinned.versions == ["2"]
    assert all(m.name == model_name for m in (*pinned.values(), unpinned))
    assert pinned["2"].parameters["max_text_tokens"] == 64  # the tiny model's positions (under the default 256)
    assert (code, err) == (0, "")
    assert json.loads(out)["versions"] == ["2"]
    assert queue_code == 0
    assert json.loads(queue_out)["versions"] == ["1"]


async def test_metadata_for_a_model_with_no_route_is_refused_and_the_cli_exits_4(
    amqp_url: str, model_name: str
) -> None:
    async with Client(amqp_url, model=model_name, timeout_s=5) as client:
        with pytest.raises(PublishRefusedError):
            await client.metadata(version="1")
    code, out, err = await _producer(amqp_url, "--model", model_name, "--version", "1")
    assert code == 4
    assert out == ""
    assert model_name in err
