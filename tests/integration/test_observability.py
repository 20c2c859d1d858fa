"""Health and metrics endpoints of a real worker: documented names, readiness, counters that move."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer.wire.names import CONTENT_TYPE_MSGPACK
from producer.wire.protocol import InferReply, encode_request
from tests.support.models import mlp_model
from tests.support.workers import RpcClient, Sent, decoded
from worker.pipelines.tensor import load_pipeline
from worker.service import Worker
from worker.settings import Settings

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parents[2] / "README.md"
WAIT_S = 20.0


class GatedPipeline:
    """The real pipeline, whose warm-up and model runs wait until the test opens their gate."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.loop_thread = threading.current_thread()
        self.warm_up_started = threading.Event()
        self.warm_up_gate = threading.Event()
        self.run_started = threading.Event()
        self.run_gate = threading.Event()
        self.run_gate.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def warm_up(self, max_rows: int) -> None:
        self.warm_up_started.set()
        if not self.warm_up_gate.wait(WAIT_S):
            raise TimeoutError("the test never opened the warm-up gate")
        self._inner.warm_up(max_rows)
        # Stand in for a model slower than the worker's inline threshold, so its runs go to the
        # model thread, where the test can hold one without blocking the event loop.
        time.sleep(0.005)

    def run(self, prepared: Sequence[Any]) -> Any:
        if not self.run_gate.is_set() and threading.current_thread() is self.loop_thread:
            raise RuntimeError("the model ran on the event loop thread; a held run would block the loop")
        self.run_started.set()
        if not self.run_gate.wait(WAIT_S):
            raise TimeoutError("the test never opened the run gate")
        return self._inner.run(prepared)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def documented_metrics() -> set[str]:
    """The metric names in the README's Metrics table."""
    return set(re.findall(r"^\| `(qinfer_[a-z_]+)` \|", DOCS.read_text(), flags=re.MULTILINE))


def exposed_metrics(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """Samples by metric name as exposed (counters with ``_total``, info with ``_info``).

    The ``*_created`` gauges (creation timestamps prometheus_client adds to counters and histograms) are left out.
    """
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue
        name = family.name + {"counter": "_total", "info": "_info"}.get(family.type, "")
        out[name] = [(s.name, dict(s.labels), s.value) for s in family.samples]
    return out


def value(metrics: dict[str, list[tuple[str, dict[str, str], float]]], sample: str, **labels: str) -> float:
    """One sample's value (0 when absent, as Prometheus would read a counter not yet incremented)."""
    for samples in metrics.values():
        for name, sample_labels, v in samples:
            if name == sample and all(sample_labels.get(k) == val for k, val in labels.items()):
                return v
    return 0.0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mlp_model(tmp_path_factory.mktemp("models") / "mlp.onnx", width=64, hidden=64)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@contextlib.asynccontextmanager
async def served(
    amqp_url: str, model: Path, queue: str, pipeline: Any = None, **overrides: Any
) -> AsyncIterator[tuple[Worker, str]]:
    """A worker with its HTTP server on a free port; yields it and its base URL once it runs."""
    settings = Settings(amqp_url=amqp_url, model=model, queue=queue, http_port=_free_port(), **overrides)
    worker = Worker(settings, pipeline or load_pipeline(settings.model_config), install_signal_handlers=False)
    task = asyncio.create_task(worker.run())
    try:
        yield worker, f"http://127.0.0.1:{settings.http_port}"
    finally:
        worker.stop_event.set()
        await task


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for a state the worker reaches on its own (it signals nothing the test could await)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        body = await (response.json() if response.content_type == "application/json" else response.text())
        return response.status, body


async def scrape(http: aiohttp.ClientSession, base: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    status, text = await get(http, f"{base}/metrics")
    assert status == 200
    return exposed_metrics(text)


def _request(rows: int, seed: int) -> Sent:
    x = np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)
    return Sent(encode_request({"x": x}, CONTENT_TYPE_MSGPACK), CONTENT_TYPE_MSGPACK)


async def test_readiness_follows_warm_up_consuming_and_drain(
    amqp_url: str,
    model: Path,
    queue: str,
    http: aiohttp.ClientSession,
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    settings = Settings(model=model)
    pipeline = GatedPipeline(load_pipeline(settings.model_config))
    async with served(amqp_url, model, queue, pipeline) as (worker, base):
        await asyncio.to_thread(pipeline.warm_up_started.wait, WAIT_S)
        assert await get(http, f"{base}/livez") == (200, {"alive": True})
        status, body = await get(http, f"{base}/readyz")
        assert (status, body["warmed"], body["ready"]) == (503, False, False)

        pipeline.warm_up_gate.set()
        await worker.consuming_event.wait()
        assert await get(http, f"{base}/readyz") == (
            200,
            {"warmed": True, "consuming": True, "draining": False, "stalled": False, "ready": True},
        )

        # Hold a model run, then drain: the worker stays alive but is no longer ready.
        pipeline.run_gate.clear()
        rpc = await RpcClient.open(connection)
        reply = await rpc.publish(queue, _request(1, 0))
        await asyncio.to_thread(pipeline.run_started.wait, WAIT_S)
        worker.stop_event.set()

        async def draining() -> bool:
            return worker.health.draining

        await until(draining, "the drain to start")
        status, body = await get(http, f"{base}/readyz")
        assert (status, body["draining"], body["ready"]) == (503, True, False)
        assert (await get(http, f"{base}/livez"))[0] == 200
        pipeline.run_gate.set()
        assert isinstance(decoded(await asyncio.wait_for(reply, WAIT_S)), InferReply)


async def test_readiness_is_false_while_a_full_window_settles_nothing_and_returns_after(
    amqp_url: str,
    model: Path,
    queue: str,
    http: aiohttp.ClientSession,
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    pipeline = GatedPipeline(load_pipeline(Settings(model=model).model_config))
    pipeline.warm_up_gate.set()
    async with served(amqp_url, model, queue, pipeline, prefetch=2, stall_s=1) as (worker, base):
        await worker.consuming_event.wait()
        rpc = await RpcClient.open(connection)
        pipeline.run_gate.clear()  # the model hangs: the two deliveries of the window stay unsettled
        replies = [await rpc.publish(queue, _request(1, seed)) for seed in range(3)]

        async def readiness(stalled: bool) -> bool:
            status, body = await get(http, f"{base}/readyz")
            return (status, body["stalled"]) == ((503, True) if stalled else (200, False))

        await until(lambda: readiness(True), "readiness to turn false on a stalled window")
        assert (await get(http, f"{base}/livez"))[0] == 200
        pipeline.run_gate.set()
        answered = [decoded(await asyncio.wait_for(r, WAIT_S)) for r in replies]
        await until(lambda: readiness(False), "readiness to return once requests settle")
    assert all(isinstance(r, InferReply) for r in answered)


async def test_metrics_endpoint_serves_exactly_the_documented_names(
    amqp_url: str, model: Path, queue: str, http: aiohttp.ClientSession, connection: aio_pika.abc.AbstractConnection
) -> None:
    documented = documented_metrics()
    assert len(documented) >= 10, f"the README lists too few metrics: {sorted(documented)}"
    async with served(amqp_url, model, queue) as (worker, base):
        await worker.consuming_event.wait()
        rpc = await RpcClient.open(connection)
        await rpc.call(queue, _request(2, 1))
        metrics = await scrape(http, base)
    assert set(metrics) == documented
    info = metrics["qinfer_model_info"][0][1]
    assert (info["name"], info["version"]) == ("mlp", "1")
    assert "CPUExecutionProvider" in info["providers"]
    histograms = ("qinfer_batch_rows", "qinfer_compute_seconds", "qinfer_broker_seconds", "qinfer_batch_wait_seconds")
    for name in histograms:
        assert {s[0] for s in metrics[name]} == {f"{name}_bucket", f"{name}_sum", f"{name}_count"}


async def test_counters_move_as_requests_are_served(
    amqp_url: str, model: Path, queue: str, http: aiohttp.ClientSession, connection: aio_pika.abc.AbstractConnection
) -> None:
    async with served(amqp_url, model, queue) as (worker, base):
        await worker.consuming_event.wait()
        before = await scrape(http, base)
        assert value(before, "qinfer_requests_total", outcome="ok") == 0
        rpc = await RpcClient.open(connection)
        good = [_request(2, seed) for seed in range(5)]
        bad = Sent(encode_request({"x": np.zeros((1, 3), np.float32)}, CONTENT_TYPE_MSGPACK), CONTENT_TYPE_MSGPACK)
        replies = await rpc.call_many(queue, [*good, bad])
        assert [type(decoded(r)).__name__ for r in replies] == ["InferReply"] * 5 + ["ErrorReply"]

        async def settled() -> bool:  # counted once the reply is confirmed, just after the client sees it
            m = await scrape(http, base)
            return value(m, "qinfer_requests_total", outcome="ok") == 5 and value(m, "qinfer_inflight_requests") == 0

        await until(settled, "the worker to settle the six requests")
        after = await scrape(http, base)
    assert value(after, "qinfer_requests_total", outcome="wrong_shape") == 1
    assert value(after, "qinfer_rows_total") == 10
    assert value(after, "qinfer_batch_rows_sum") == 10
    assert value(after, "qinfer_batch_requests_sum") == 5
    runs = value(after, "qinfer_compute_seconds_count")
    assert 1 <= runs <= 5
    assert value(after, "qinfer_batch_rows_count") == runs
    assert value(after, "qinfer_batch_wait_seconds_count") == 5
    assert value(after, "qinfer_broker_seconds_count") == 6  # the x-published-ms header of every request
    assert value(after, "qinfer_reply_seconds_count") == runs
    assert value(after, "qinfer_compute_seconds_sum") > 0
