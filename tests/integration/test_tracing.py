"""OpenTelemetry traces through the queue: a real broker, a real worker, the SDK's in-memory exporter or
a real OTLP/HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from producer.client.rpc import Client
from producer.wire.errors import ErrorReplyError
from producer.wire.names import CONTENT_TYPE_MSGPACK, HEADER_DEADLINE_MS
from producer.wire.protocol import ErrorReply, InferReply, encode_request
from tests.integration.test_observability import GatedPipeline
from tests.support.models import mlp_model
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.worker_process import WorkerProcess
from tests.support.workers import RpcClient, Sent, decoded, running_worker
from worker.pipelines.tensor import load_pipeline
from worker.service import Worker
from worker.settings import Settings

pytestmark = pytest.mark.integration

WAIT_S = 20.0
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
OTLP_CONSUMER = 5
OTLP_ERROR = 2


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mlp_model(tmp_path_factory.mktemp("models") / "mlp.onnx", width=64, hidden=64)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def traced_worker(
    amqp_url: str, model: Path, queue: str, provider: TracerProvider, pipeline: Any = None, **overrides: Any
) -> contextlib.AbstractAsyncContextManager[Worker]:
    """An in-process worker whose spans go to ``provider``; drained on exit."""
    return running_worker(amqp_url, model, queue, pipeline=pipeline, tracer_provider=provider, **overrides)


def request(rows: int = 1, seed: int = 0, width: int = 64) -> Sent:
    x = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    return Sent(encode_request({"x": x}, CONTENT_TYPE_MSGPACK), CONTENT_TYPE_MSGPACK)


def traceparent(trace_id: str = TRACE_ID, parent_id: str = PARENT_ID) -> dict[str, Any]:
    return {"traceparent": f"00-{trace_id}-{parent_id}-01", "tracestate": "vendor=opaque"}


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


async def finished(
    exporter: InMemorySpanExporter, predicate: Callable[[Sequence[ReadableSpan]], bool]
) -> Sequence[ReadableSpan]:
    """The finished spans once ``predicate`` holds (request spans end when the delivery is settled,
    just after the client has its reply)."""
    deadline = time.monotonic() + WAIT_S
    while not predicate(spans := exporter.get_finished_spans()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; spans: {[s.name for s in spans]}")
        await asyncio.sleep(0.01)
    return spans


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    assert parent.context is not None
    return {s.name: s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id}


async def test_a_plain_publishers_traceparent_parents_the_workers_spans(
    amqp_url: str,
    model: Path,
    queue: str,
    connection: aio_pika.abc.AbstractConnection,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    async with traced_worker(amqp_url, model, queue, provider):
        rpc = await RpcClient.open(connection)
        sent = request()
        sent.headers = traceparent()
        reply = await rpc.call(queue, sent)
        assert isinstance(decoded(reply), InferReply)
        spans = await finished(exporter, lambda s: bool(named(s, f"process {queue}")))

    (process,) = named(spans, f"process {queue}")
    assert hex_ids(process)[0] == TRACE_ID
    assert process.parent is not None
    assert format(process.parent.span_id, "016x") == PARENT_ID
    assert process.parent.is_remote
    assert process.kind is SpanKind.CONSUMER
    assert process.status.status_code is StatusCode.UNSET
    attributes = dict(process.attributes or {})
    assert attributes["messaging.system"] == "rabbitmq"
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.destination.name"] == queue
    assert attributes["messaging.message.conversation_id"] == reply.correlation_id
    assert attributes["qinfer.broker_ms"] >= 0
    assert attributes["qinfer.outcome"] == "replied"
    steps = children(spans, process)
    assert set(steps) == {"decode", "batch wait", "publish reply"}
    assert steps["publish reply"].kind is SpanKind.PRODUCER
    assert all(hex_ids(s)[0] == TRACE_ID for s in steps.values())
    # The reply carries the reply publish's context back, tracestate included.
    assert reply.headers is not None
    assert reply.headers["traceparent"] == f"00-{TRACE_ID}-{hex_ids(steps['publish reply'])[1]}-01"
    assert reply.headers["tracestate"] == "vendor=opaque"
    (run,) = named(spans, "run mlp")
    assert [format(link.context.span_id, "016x") for link in run.links] == [hex_ids(process)[1]]
    assert run.parent is None


async def test_a_batch_of_n_requests_is_one_model_run_span_linked_to_each(
    amqp_url: str,
    model: Path,
    queue: str,
    connection: aio_pika.abc.AbstractConnection,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    n = 6
    pipeline = GatedPipeline(load_pipeline(Settings(model=model).model_config))
    pipeline.warm_up_gate.set()
    async with traced_worker(amqp_url, model, queue, provider, pipeline, max_batch=64):
        rpc = await RpcClient.open(connection)
        pipeline.run_gate.clear()  # the first request's run waits: the next n pile up for one batch
        first = await rpc.publish(queue, request(1, 99))
        await asyncio.to_thread(pipeline.run_started.wait, WAIT_S)
        waiting = [await rpc.publish(queue, request(2, seed)) for seed in range(n)]

        await finished(exporter, lambda s: len(named(s, "decode")) == n + 1)  # all n wait for the model
        pipeline.run_gate.set()
        replies = [decoded(await asyncio.wait_for(f, WAIT_S)) for f in (first, *waiting)]
        assert all(isinstance(r, InferReply) for r in replies)
        spans = await finished(exporter, lambda s: len(named(s, f"process {queue}")) == n + 1)

    runs = named(spans, "run mlp")
    assert len(runs) == 2
    (batch,) = [r for r in runs if len(r.links) == n]
    processes = [p for p in named(spans, f"process {queue}") if dict(p.attributes or {})["qinfer.rows"] == 2]
    assert {link.context.span_id for link in batch.links} == {p.context.span_id for p in processes if p.context}
    attributes = dict(batch.attributes or {})
    assert (attributes["qinfer.batch.requests"], attributes["qinfer.batch.rows"]) == (n, 2 * n)
    assert attributes["qinfer.device"] == "CPUExecutionProvider"
    assert attributes["qinfer.compute_ms"] > 0
    assert batch.parent is None  # linked, not parented
    for process in processes:  # each request waited for this batch, then replied
        steps = children(spans, process)
        assert steps["batch wait"].end_time == batch.start_time
        assert steps["publish reply"].start_time is not None
        assert batch.end_time is not None
        assert steps["publish reply"].start_time >= batch.end_time


async def test_error_replies_and_deadline_skips_set_an_error_status(
    amqp_url: str,
    model: Path,
    queue: str,
    connection: aio_pika.abc.AbstractConnection,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    async with traced_worker(amqp_url, model, queue, provider):
        rpc = await RpcClient.open(connection)
        wrong = request(width=3)
        wrong.headers = traceparent(parent_id="00000000000000a1")
        late = request()
        late.headers = {**traceparent(parent_id="00000000000000a2"), HEADER_DEADLINE_MS: int(time.time() * 1000) - 1}
        replies = [decoded(r) for r in await rpc.call_many(queue, [wrong, late])]
        assert [r.code for r in replies if isinstance(r, ErrorReply)] == ["wrong_shape", "deadline_exceeded"]
        spans = await finished(exporter, lambda s: len(named(s, f"process {queue}")) == 2)

    by_parent = {format(s.parent.span_id, "016x"): s for s in named(spans, f"process {queue}") if s.parent}
    for parent_id, code in (("00000000000000a1", "wrong_shape"), ("00000000000000a2", "deadline_exceeded")):
        span = by_parent[parent_id]
        assert span.status.status_code is StatusCode.ERROR
        assert dict(span.attributes or {})["error.type"] == code
    assert children(spans, by_parent["00000000000000a1"])["decode"].status.status_code is StatusCode.ERROR
    assert not named(spans, "run mlp")  # neither was computed


async def test_the_client_span_is_the_parent_and_ends_with_the_round_trip(
    amqp_url: str, model: Path, queue: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with (
        traced_worker(amqp_url, model, queue, provider),
        Client(amqp_url, queue=queue, tracer_provider=provider) as client,
    ):
        started_ns = time.time_ns()
        await client.infer({"x": np.ones((2, 64), np.float32)}, timeout_s=10)
        replied_ns = time.time_ns()
        with pytest.raises(ErrorReplyError):
            await client.infer({"x": np.ones((2, 3), np.float32)}, timeout_s=10)
        spans = await finished(exporter, lambda s: len(named(s, f"process {queue}")) == 2)

    ok, failed = sorted(named(spans, f"publish {queue}"), key=lambda s: s.start_time or 0)
    assert ok.kind is SpanKind.PRODUCER
    assert dict(ok.attributes or {})["messaging.destination.name"] == queue
    assert ok.start_time is not None
    assert ok.end_time is not None
    assert started_ns <= ok.start_time
    assert ok.end_time <= replied_ns
    processes = {s.parent.span_id: s for s in named(spans, f"process {queue}") if s.parent}
    assert ok.context is not None
    assert ok.context.span_id in processes
    process = processes[ok.context.span_id]
    reply_publish = children(spans, process)["publish reply"]
    # The client's span ends after the reply arrived, linked to the worker's reply publish.
    assert reply_publish.context is not None
    assert reply_publish.start_time is not None
    assert [link.context.span_id for link in ok.links] == [reply_publish.context.span_id]
    assert ok.end_time >= reply_publish.start_time
    assert failed.status.status_code is StatusCode.ERROR
    assert dict(failed.attributes or {})["error.type"] == "wrong_shape"


async def test_otlp_export_from_env_and_log_lines_carry_the_trace(
    amqp_url: str, model: Path, queue: str, connection: aio_pika.abc.AbstractConnection
) -> None:
    """A worker process configured only by OTEL_* variables exports to a real OTLP/HTTP receiver."""
    async with OtlpReceiver() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": "qinfer-test-worker",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
        async with WorkerProcess(amqp_url, model, queue, env=env) as worker:
            rpc = await RpcClient.open(connection)
            wrong = request(width=3)
            wrong.headers = traceparent()
            assert isinstance(decoded(await rpc.call(queue, wrong)), ErrorReply)
            line = await worker.wait_for_async("bad_request")
            spans = await receiver.wait_for(lambda s: any(x.name == f"process {queue}" for x in s))

    (process,) = [s for s in spans if s.name == f"process {queue}"]
    assert (process.trace_id, process.parent_span_id, process.kind) == (TRACE_ID, PARENT_ID, OTLP_CONSUMER)
    assert process.status_code == OTLP_ERROR
    assert process.resource["service.name"] == "qinfer-test-worker"
    assert process.resource["deployment.environment"] == "test"
    assert (line["trace_id"], line["span_id"]) == (TRACE_ID, process.span_id)
    assert json.dumps(line)  # a JSON log line, as a collector reads it
    started = worker.events("worker_started")[0]
    assert "trace_id" not in started  # outside any request: no ids
