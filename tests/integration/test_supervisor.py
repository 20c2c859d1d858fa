"""``worker run --processes N`` against the real broker: one supervisor, N consumer processes.

Each test starts the supervisor through :mod:`tests.support.worker_process` and waits on its log events
(its consumer processes log to the same stream, each line with its ``child`` slot).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import aio_pika
import numpy as np
import pytest

from producer.wire.names import CONTENT_TYPE_MSGPACK as MSGPACK
from producer.wire.protocol import InferReply, encode_request
from tests.support.faults import freeze_holding, paused
from tests.support.models import mlp_model
from tests.support.worker_process import WorkerProcess
from tests.support.workers import RpcClient, Sent, decoded

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ONE_CORE = ("--intra-op-threads", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return mlp_model(tmp_path / "mlp.onnx", width=16, hidden=16, layers=2)


def _requests(n: int, rows: int = 2) -> list[Sent]:
    rng = np.random.default_rng(0)
    return [Sent(encode_request({"x": rng.random((rows, 16), dtype=np.float32)}, MSGPACK), MSGPACK) for _ in range(n)]


@pytest.mark.timeout(180)
async def test_two_processes_share_the_queue_metrics_add_up_and_sigterm_drains_both(
    amqp_url: str, model: Path, queue: str, connection: aio_pika.abc.AbstractConnection
) -> None:
    n, rows = 400, 2
    supervisor = WorkerProcess(amqp_url, model, queue, "--processes", "2", *ONE_CORE, http_port=_free_port())
    async with supervisor:
        assert set(supervisor.children()) == {0, 1}
        rpc = await RpcClient.open(connection)
        replies = [decoded(m) for m in await rpc.call_many(queue, _requests(n, rows))]
        assert all(isinstance(r, InferReply) for r in replies)
        per_child = [supervisor.child_metric(slot, "qinfer_requests_total", outcome="ok") for slot in (0, 1)]
        assert all(count > 0 for count in per_child), f"one process took every request: {per_child}"
        assert sum(per_child) == n
        assert await supervisor.metric_async("qinfer_requests_total", outcome="ok") == n
        assert await supervisor.metric_async("qinfer_rows_total") == n * rows
        assert await supervisor.metric_async("qinfer_batch_requests_sum") == n
        assert await supervisor.metric_async("qinfer_processes") == 2
        assert await supervisor.metric_async("qinfer_inflight_requests") == 0
        pids = {slot: event["pid"] for slot, event in supervisor.children().items()}
    assert supervisor.returncode == 0
    drained = supervisor.events("worker_drained")
    assert sorted(e["child"] for e in drained) == [0, 1]
    assert all(e["unfinished"] == 0 for e in drained)
    assert {e["pid"] for e in supervisor.events("process_drained")} == set(pids.values())
    assert supervisor.events("supervisor_stopped")[-1]["clean"] is True
    assert not supervisor.events("process_died")


@pytest.mark.timeout(180)
async def test_a_killed_consumer_process_is_restarted_and_nothing_is_lost(
    amqp_url: str, model: Path, queue: str, connection: aio_pika.abc.AbstractConnection
) -> None:
    n = 600
    supervisor = WorkerProcess(amqp_url, model, queue, "--processes", "2", *ONE_CORE, http_port=_free_port())
    async with supervisor:
        rpc = await RpcClient.open(connection)
        consumers = [int(supervisor.children()[slot]["pid"]) for slot in (0, 1)]
        victim = consumers[0]
        async with paused(consumers):
            pending = [await rpc.publish(queue, sent) for sent in _requests(n)]
            # Mid-load, observed: killed while it holds deliveries it has not settled.
            [held] = await freeze_holding([victim], what="consumer process 0", at_least=8)
            os.kill(victim, signal.SIGKILL)  # the requests it holds unacked go back to the queue
        died = await supervisor.wait_for_async("process_died", match={"child": 0, "pid": victim})
        assert died["signal"] == "SIGKILL"
        restarted = await supervisor.wait_for_async("process_started", match={"child": 0}, nth=2)
        assert restarted["pid"] != victim
        replies = [decoded(m) for m in await asyncio.wait_for(asyncio.gather(*pending), 120)]
        assert all(isinstance(r, InferReply) for r in replies)
        assert await supervisor.wait_readyz_async(200, 60), "ready again once the new process consumes"
        assert await supervisor.metric_async("qinfer_process_restarts_total") == 1
        assert await supervisor.metric_async("qinfer_redelivered_total") >= held
    assert supervisor.returncode == 0
    assert supervisor.events("supervisor_stopped")[-1]["clean"] is True


@pytest.mark.timeout(120)
def test_processes_that_keep_dying_make_the_supervisor_exit_non_zero(amqp_url: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.onnx"
    supervisor = WorkerProcess(
        amqp_url, missing, "unused", "--processes", "2", "--max-deaths", "3", "--restart-backoff-max-s", "0.1"
    ).start()
    assert supervisor.wait(90) == 1
    assert len(supervisor.events("process_died")) == 3
    gave_up = supervisor.events("too_many_process_deaths")
    assert gave_up
    assert gave_up[0]["deaths"] == 3
    assert "no model at" in " ".join(e.get("error", "") for e in supervisor.events("worker_failed"))


@pytest.mark.timeout(60)
def test_one_process_runs_the_worker_in_the_process_itself(amqp_url: str, model: Path, queue: str) -> None:
    worker = WorkerProcess(amqp_url, model, queue, "--processes", "1", "--exit-when-idle").start()
    assert worker.wait(45) == 0
    assert worker.events("worker_started")
    assert worker.events("worker_drained")
    assert not worker.events("supervisor_started")
    assert "child" not in worker.events("worker_started")[0]


@pytest.mark.timeout(60)
def test_with_exit_when_idle_the_supervisor_exits_0_once_every_process_finished(
    amqp_url: str, model: Path, queue: str
) -> None:
    supervisor = WorkerProcess(amqp_url, model, queue, "--processes", "2", "--exit-when-idle", *ONE_CORE).start()
    assert supervisor.wait(45) == 0
    assert sorted(e["child"] for e in supervisor.events("process_finished")) == [0, 1]
    assert not supervisor.events("process_restarting")
