"""Fault injection against real worker processes and a real broker, with Jepsen-style counters.

Each scenario starts ``worker run`` processes, publishes requests (publisher confirms) whose
replies go to a durable results queue, injects one fault, then waits until every confirmed
request has an outcome (or the scenario's time bound passes) and counts:

    sent, confirmed, replied ok / error, duplicated, dead-lettered,
    lost = confirmed requests with neither a reply nor a dead-letter entry   (must be 0)

A request published during an outage whose publish was never confirmed is not counted as lost:
the broker never accepted it (its publisher saw the failure).

Every fault aimed at a worker is injected at a state the scenario has observed, never at a moment
guessed from reply counts: every consumer of the queue is stopped (SIGSTOP) while the load is
published (:func:`tests.support.faults.paused`), then only the targets run, and
:func:`tests.support.faults.freeze_holding` stops them at a moment when each holds :data:`HELD_AT_FAULT`
unsettled deliveries (its in-flight gauge, read from its metric file) for the signal or the
disconnect; the others run again after it. What a scenario asserts about redeliveries and
drains then holds on every run, however busy the machine.

Faults that need ``rabbitmqctl`` (broker restart, closed connections) run only where it is
installed and the broker is local. Connection faults run in a vhost of their own
(:data:`CHAOS_VHOST`), so ``close_all_connections`` there touches nobody else's connections;
a broker restart (``stop_app``/``start_app``) disrupts every client of the broker, so it runs
only when asked for (``--broker-restart``, or ``make chaos``).

    python -m tests.chaos.harness [--quick] [--broker-restart] [SCENARIO ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import aio_pika
import numpy as np

from producer.wire.names import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_MSGPACK,
    HEADER_DEADLINE_MS,
    HEADER_PUBLISHED_MS,
    dead_letter_queue,
    request_queue_arguments,
    results_queue,
)
from producer.wire.protocol import ErrorReply, decode_reply, encode_request
from tests.support.faults import NotHolding, freeze_holding, metrics_env, paused, resume
from tests.support.worker_process import WorkerProcess

CHAOS_VHOST = "qinfer-chaos"
CRASH_VALUE = 666.0
POISON_VALUE = 1000.0
BROKER_RESTART = "broker_restart"


# ---------------------------------------------------------------------------------------------
# Counters


@dataclasses.dataclass
class Counters:
    """One scenario's outcome, Jepsen style, with the checks that failed (empty: it passed)."""

    scenario: str
    sent: int = 0
    confirmed: int = 0
    replied_ok: int = 0
    replied_error: int = 0
    duplicated: int = 0
    dead_lettered: int = 0
    lost: int = 0
    elapsed_s: float = 0.0
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)

    def expect(self, condition: bool, what: str) -> None:
        """Record ``what`` as a failure unless ``condition`` holds."""
        if not condition:
            self.failures.append(what)

    @property
    def passed(self) -> bool:
        return not self.failures and self.lost == 0


COLUMNS = ("scenario", "sent", "confirmed", "ok", "error", "dup", "dead", "lost", "time_s", "result", "notes")


def format_table(rows: Iterable[Counters]) -> str:
    """The counter table, one scenario per line."""
    lines = [
        [
            c.scenario,
            str(c.sent),
            str(c.confirmed),
            str(c.replied_ok),
            str(c.replied_error),
            str(c.duplicated),
            str(c.dead_lettered),
            str(c.lost),
            f"{c.elapsed_s:.1f}",
            "PASS" if c.passed else "FAIL",
            " ".join(f"{k}={v}" for k, v in c.notes.items()),
        ]
        for c in rows
    ]
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(COLUMNS)]
    out = [" | ".join(h.ljust(w) for h, w in zip(COLUMNS, widths, strict=True))]
    out.append("-|-".join("-" * w for w in widths))
    out += [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in lines]
    return "\n".join(out)


class Ledger:
    """The client's record: what was sent and confirmed, and every outcome seen, by request id."""

    def __init__(self) -> None:
        self.sent: set[str] = set()
        self.confirmed: set[str] = set()
        self.replies: dict[str, str] = {}  # id -> "ok" or the error code of its first reply
        self.duplicated = 0
        self.dead: dict[str, str] = {}  # id -> x-death reason
        self._changed = asyncio.Event()

    def on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        cid = message.correlation_id or ""
        if cid in self.replies:
            # A copy the broker delivered to us again (we did not ack it) is not a second reply.
            if not message.redelivered:
                self.duplicated += 1
            return
        reply = decode_reply(message.body, message.content_type)
        self.replies[cid] = reply.code if isinstance(reply, ErrorReply) else "ok"
        self._changed.set()

    def on_dead(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        cid = message.correlation_id or ""
        deaths = (message.headers or {}).get("x-death") or [{}]
        self.dead.setdefault(cid, str(deaths[0].get("reason", "?")))  # type: ignore[union-attr,index]
        self._changed.set()

    def unresolved(self) -> set[str]:
        """Confirmed requests with neither a reply nor a dead-letter entry (yet)."""
        return self.confirmed - self.replies.keys() - self.dead.keys()

    def resolved(self) -> int:
        return len(self.confirmed) - len(self.unresolved())

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``predicate()`` holds after an outcome arrives; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True

    async def wait_resolved(self, timeout_s: float) -> bool:
        return await self.wait_for(lambda: not self.unresolved(), timeout_s)

    def counters(self, scenario: str) -> Counters:
        errors = sum(1 for v in self.replies.values() if v != "ok")
        return Counters(
            scenario,
            sent=len(self.sent),
            confirmed=len(self.confirmed),
            replied_ok=len(self.replies) - errors,
            replied_error=errors,
            duplicated=self.duplicated,
            dead_lettered=len(self.dead.keys() - self.replies.keys()),
            lost=len(self.unresolved()),
        )


# ---------------------------------------------------------------------------------------------
# Broker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Broker:
    """Where the scenarios run, and how faults are injected into the broker."""

    url: str
    ctl: str | None  # rabbitmqctl, when it is installed and controls this (local) broker

    @classmethod
    def prepare(cls, base_url: str) -> Broker:
        """Use :data:`CHAOS_VHOST` when ``rabbitmqctl`` controls the broker, else ``base_url`` as is."""
        parsed = urlparse(base_url)
        local = parsed.hostname in ("127.0.0.1", "localhost", "::1")
        ctl = shutil.which("rabbitmqctl") if local else None
        if ctl is not None:
            probe = subprocess.run([ctl, "-q", "status"], capture_output=True, timeout=60, check=False)
            if probe.returncode != 0:
                ctl = None
        if ctl is None:
            return cls(base_url, None)
        subprocess.run([ctl, "-q", "add_vhost", CHAOS_VHOST], capture_output=True, timeout=60, check=False)
        user = parsed.username or "guest"
        subprocess.run(
            [ctl, "-q", "set_permissions", "-p", CHAOS_VHOST, user, ".*", ".*", ".*"],
            capture_output=True,
            timeout=60,
            check=True,
        )
        return cls(urlunparse(parsed._replace(path="/" + CHAOS_VHOST)), ctl)

    def run_ctl(self, *args: str, timeout_s: float = 120.0) -> None:
        assert self.ctl is not None
        subprocess.run([self.ctl, "-q", *args], capture_output=True, timeout=timeout_s, check=True)

    async def ctl_async(self, *args: str, timeout_s: float = 120.0) -> None:
        await asyncio.to_thread(self.run_ctl, *args, timeout_s=timeout_s)

    @contextlib.asynccontextmanager
    async def stopped(self) -> AsyncIterator[None]:
        """``stop_app`` for the body; ``start_app`` and ``await_startup`` always follow."""
        await self.ctl_async("stop_app")
        try:
            yield
        finally:
            await self.ctl_async("start_app")
            await self.ctl_async("await_startup")


# ---------------------------------------------------------------------------------------------
# Client


class Client:
    """Publishes requests with confirms; collects replies (results queue) and dead letters."""

    def __init__(self, url: str, queue: str, *, delivery_limit: int, results_arguments: dict[str, Any]) -> None:
        self.url = url
        self.queue = queue
        self.results = results_queue(queue)
        self.delivery_limit = delivery_limit
        self.results_arguments = results_arguments
        self.ledger = Ledger()
        self._conn: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None

    async def open(self) -> None:
        self._conn = await aio_pika.connect_robust(self.url, client_properties={"connection_name": "chaos-client"})
        self._channel = await self._conn.channel(publisher_confirms=True)
        await self._channel.set_qos(prefetch_count=500)
        await self._channel.declare_queue(
            dead_letter_queue(self.queue), durable=True, arguments={"x-queue-type": "quorum"}
        )
        await self.declare_request_queue()
        await self._channel.declare_queue(self.results, durable=True, arguments=self.results_arguments)

    async def declare_request_queue(self) -> None:
        assert self._channel is not None
        await self._channel.declare_queue(
            self.queue, durable=True, arguments=request_queue_arguments(self.queue, delivery_limit=self.delivery_limit)
        )

    async def delete_request_queue(self) -> None:
        assert self._channel is not None
        await self._channel.queue_delete(self.queue, if_unused=False, if_empty=False)

    async def collect_dead_letters(self) -> None:
        assert self._channel is not None
        dead = await self._channel.get_queue(dead_letter_queue(self.queue))
        await dead.consume(self._dead)

    async def collect_replies(self) -> None:
        assert self._channel is not None
        results = await self._channel.get_queue(self.results)
        await results.consume(self._reply)

    async def _reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.ledger.on_reply(message)
        with contextlib.suppress(Exception):  # a lost ack means the broker delivers it again
            await message.ack()

    async def _dead(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.ledger.on_dead(message)
        with contextlib.suppress(Exception):
            await message.ack()

    async def publish(
        self,
        cid: str,
        body: bytes,
        content_type: str = CONTENT_TYPE_MSGPACK,
        *,
        expiration_s: float | None = None,
        deadline_ms: int | None = None,
    ) -> None:
        """Publish one request; it counts as confirmed once the broker confirms it."""
        assert self._channel is not None
        self.ledger.sent.add(cid)
        headers: dict[str, Any] = {HEADER_PUBLISHED_MS: int(time.time() * 1000)}
        if deadline_ms is not None:
            headers[HEADER_DEADLINE_MS] = deadline_ms
        try:
            await self._channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    content_type=content_type,
                    correlation_id=cid,
                    reply_to=self.results,
                    headers=headers,
                    expiration=expiration_s,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=self.queue,
                timeout=30,
            )
        except Exception:
            return  # not confirmed: the broker may or may not have it; it cannot be counted lost
        self.ledger.confirmed.add(cid)

    async def publish_all(self, requests: Iterable[tuple[str, bytes, str]], concurrency: int = 256) -> None:
        """Publish ``(id, body, content_type)`` requests, ``concurrency`` confirms in flight at most."""
        limit = asyncio.Semaphore(concurrency)

        async def one(cid: str, body: bytes, content_type: str) -> None:
            async with limit:
                await self.publish(cid, body, content_type)

        await asyncio.gather(*(one(*r) for r in requests))

    async def queue_depth(self, name: str) -> int:
        assert self._channel is not None
        declared = await self._channel.declare_queue(name, passive=True)
        return declared.declaration_result.message_count or 0

    async def close(self) -> None:
        if self._conn is None:
            return
        with contextlib.suppress(Exception):
            channel = await self._conn.channel()
            for name in (self.results, self.queue, dead_letter_queue(self.queue)):
                await channel.queue_delete(name, if_unused=False, if_empty=False)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._conn.close(), 10)


# ---------------------------------------------------------------------------------------------
# Worker processes (started by tests.support.worker_process, as every test and benchmark starts them)


class Supervisor:
    """Restarts a worker whenever it dies (as a Deployment would); counts the crashes."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.crashes = 0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Supervisor:
        self.worker.start()
        self._task = asyncio.create_task(self._watch())
        return self

    async def _watch(self) -> None:
        while not self._stopping:
            rc = await self.worker.wait_async(3600)
            if self._stopping or rc is None:
                return
            self.crashes += 1
            self.worker.start()

    async def stop(self) -> int | None:
        self._stopping = True
        rc = await self.worker.stop_async()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)
        return rc


# ---------------------------------------------------------------------------------------------
# Scenario context


def _build_models(root: Path) -> dict[str, Path]:
    from tests.chaos.models import poison_model
    from tests.support.models import affine_model, mlp_model

    return {
        "affine": affine_model(root / "affine.onnx"),
        "affine_256": affine_model(root / "affine_256.onnx", width=256),
        # Heavy enough that a batch takes milliseconds, so faults land mid-batch.
        "mlp": mlp_model(root / "mlp.onnx", width=256, hidden=1024, layers=4),
        "poison": poison_model(root / "poison.onnx"),
    }


class Chaos:
    """Shared by the scenarios: the broker, the models, and the cleanup list."""

    def __init__(self, broker: Broker, workdir: Path, *, quick: bool) -> None:
        self.broker = broker
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.quick = quick
        self.models = _build_models(workdir)
        self._workers: list[WorkerProcess] = []
        self._clients: list[Client] = []

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Chaos]:
        """Stop every worker and delete every queue afterwards."""
        try:
            yield self
        finally:
            await self.cleanup()

    async def cleanup(self) -> None:
        for worker in self._workers:
            if worker.returncode is None:
                await worker.stop_async(grace_s=10)
        for client in self._clients:
            await client.close()
        self._workers.clear()
        self._clients.clear()

    def count(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    async def client(
        self, name: str, *, delivery_limit: int = 5, results_arguments: dict[str, Any] | None = None
    ) -> Client:
        queue = f"chaos.{name}.{uuid.uuid4().hex[:8]}"
        client = Client(
            self.broker.url,
            queue,
            delivery_limit=delivery_limit,
            results_arguments=results_arguments or {"x-queue-type": "quorum"},
        )
        self._clients.append(client)
        await client.open()
        return client

    def worker(
        self,
        name: str,
        client: Client,
        model: str = "mlp",
        *,
        crash_on: float | None = None,
        amqp_url: str | None = None,
        observable: bool = False,
        **settings: Any,
    ) -> WorkerProcess:
        """A worker process (not started) serving ``client``'s queue; ``settings`` as WORKER_* values.

        Its log goes to the work folder; its HTTP port is a free one, and readiness is ``/readyz``.
        ``crash_on`` runs :mod:`tests.chaos.crashing_worker`, which aborts on a request holding that value.
        ``observable``: a lone worker keeps its metrics in files too (as a supervisor's consumer
        processes do), so :func:`tests.support.faults.freeze_holding` can read them while it is stopped.
        """
        env = {
            "WORKER_DELIVERY_LIMIT": str(client.delivery_limit),
            "WORKER_INTRA_OP_THREADS": "1",
            "WORKER_MAX_BATCH": "64",
            "WORKER_DRAIN_TIMEOUT_S": "20",
            "WORKER_CONNECT_TIMEOUT_S": "30",
        }
        env.update({f"WORKER_{k.upper()}": str(v) for k, v in settings.items()})
        if crash_on is not None:
            env["CHAOS_CRASH_ON"] = str(crash_on)  # read by tests.chaos.crashing_worker
        if observable:
            env.update(metrics_env(self.workdir / "metrics"))
        process = WorkerProcess(
            amqp_url or self.broker.url,
            self.models[model],
            client.queue,
            http_port=_free_port(),
            env=env,
            module="worker.cli" if crash_on is None else "tests.chaos.crashing_worker",
            name=name,
            log_path=self.workdir / f"{client.queue}.{name}.log",
        )
        self._workers.append(process)
        return process


def _requests(
    n: int, prefix: str, *, seed: int = 0, width: int = 256, special: dict[int, float] | None = None
) -> list[tuple[str, bytes, str]]:
    """``n`` valid requests of 1-3 rows in both encodings; ``special[i]`` sets request i's x[0, 0]."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.random((int(rng.integers(1, 4)), width), dtype=np.float32)
        if special and i in special:
            x[0, 0] = special[i]
        content_type = CONTENT_TYPE_MSGPACK if i % 2 else CONTENT_TYPE_JSON
        cid = f"{prefix}{i}"
        out.append((cid, encode_request({"x": x}, content_type, request_id=cid), content_type))
    return out


INVALID_BODIES: list[tuple[str, bytes, str]] = [
    ("bad_encoding", b"{not json", CONTENT_TYPE_JSON),
    ("bad_encoding", b"\xc1\xc1", CONTENT_TYPE_MSGPACK),
    ("unsupported_content_type", b"x=1", "text/plain"),
    (
        "unknown_input",
        json.dumps({"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}).encode(),
        CONTENT_TYPE_JSON,
    ),
    (
        "wrong_datatype",
        json.dumps({"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 256], "data": [1] * 256}]}).encode(),
        CONTENT_TYPE_JSON,
    ),
    ("wrong_shape", encode_request({"x": np.zeros((1, 3), np.float32)}, CONTENT_TYPE_MSGPACK), CONTENT_TYPE_MSGPACK),
    (
        "too_many_rows",
        encode_request({"x": np.zeros((65, 256), np.float32)}, CONTENT_TYPE_MSGPACK),
        CONTENT_TYPE_MSGPACK,
    ),
    (
        "invalid_tensor",
        json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 256], "data": [1]}]}).encode(),
        CONTENT_TYPE_JSON,
    ),
]
"""A fixed corpus of invalid requests, each with the error code its reply must carry."""


# ---------------------------------------------------------------------------------------------
# Scenarios

RESOLVE_TIMEOUT_S = 120.0
HELD_AT_FAULT = 16
"""Deliveries each target process holds, unsettled, when a fault is injected: more than one, so its
prefetch window has opened (it starts at one delivery) and the fault lands mid-load."""


async def _finish(client: Client, name: str, started: float, *workers: WorkerProcess) -> Counters:
    """Wait for every outcome, stop the workers, and count."""
    resolved = await client.ledger.wait_resolved(RESOLVE_TIMEOUT_S)
    for worker in workers:
        await worker.stop_async()
    counters = client.ledger.counters(name)
    counters.elapsed_s = time.monotonic() - started
    counters.expect(resolved, f"outcomes still missing after {RESOLVE_TIMEOUT_S:.0f} s")
    counters.expect(counters.confirmed == counters.sent, "every publish confirmed (no fault on the publish path)")
    return counters


async def scenario_sigkill(chaos: Chaos) -> Counters:
    """SIGKILL one of two workers mid-load: its unacked requests are redelivered to the other."""
    started = time.monotonic()
    n = chaos.count(2000, 600)
    client = await chaos.client("sigkill")
    await client.collect_replies()
    await client.collect_dead_letters()
    a, b = chaos.worker("a", client, observable=True).start(), chaos.worker("b", client).start()
    await a.wait_ready_async()
    await b.wait_ready_async()
    async with paused([_pid(a), _pid(b)]):
        await client.publish_all(_requests(n, "k"))
        held = await freeze_holding([_pid(a)], what="worker a", at_least=HELD_AT_FAULT)
        a.signal(signal.SIGKILL)
        killed_at = client.ledger.resolved()
    await a.wait_async(10)
    redelivered = await b.metric_async("qinfer_redelivered_total") if await client.ledger.wait_resolved(60) else 0
    counters = await _finish(client, "sigkill", started, b)
    counters.notes.update(held_at_kill=held[0], resolved_at_kill=killed_at, redelivered=int(redelivered))
    counters.expect(redelivered > 0, "the survivor received redelivered requests")
    counters.expect(redelivered >= held[0], "every request the killed worker held was redelivered")
    return counters


async def scenario_sigterm(chaos: Chaos) -> Counters:
    """SIGTERM one of two workers mid-load: it drains (finishes what it computes, hands back the
    rest) and exits 0; nothing it had is answered twice."""
    started = time.monotonic()
    n = chaos.count(2000, 600)
    client = await chaos.client("sigterm")
    await client.collect_replies()
    await client.collect_dead_letters()
    a, b = chaos.worker("a", client, observable=True).start(), chaos.worker("b", client).start()
    await a.wait_ready_async()
    await b.wait_ready_async()
    async with paused([_pid(a), _pid(b)]):
        await client.publish_all(_requests(n, "t"))
        held = await freeze_holding([_pid(a)], what="worker a", at_least=HELD_AT_FAULT)
        signalled = time.monotonic()
        a.signal(signal.SIGTERM)  # delivered as it resumes, holding what it held
    rc = await a.wait_async(30)
    exit_s = time.monotonic() - signalled
    drained = a.events("worker_drained")
    counters = await _finish(client, "sigterm", started, b)
    counters.notes.update(
        held_at_signal=held[0],
        exit_code=rc,
        exit_after_s=round(exit_s, 3),
        drain_s=drained[-1]["drain_s"] if drained else None,
        handed_back=drained[-1]["handed_back"] if drained else None,
    )
    counters.expect(rc == 0, "the drained worker exits 0")
    counters.expect(bool(drained) and drained[-1]["unfinished"] == 0, "the drain finished within its timeout")
    counters.expect(counters.duplicated == 0, "a drain answers nothing twice")
    return counters


def _pid(worker: WorkerProcess) -> int:
    assert worker.pid is not None
    return worker.pid


def _consumer_pids(supervisor: WorkerProcess) -> list[int]:
    """The pids of a supervisor's consumer processes, by slot."""
    return [int(event["pid"]) for _slot, event in sorted(supervisor.children().items())]


async def scenario_supervisor_sigterm(chaos: Chaos) -> Counters:
    """SIGTERM to a supervisor of two consumer processes mid-load: both drain, it exits 0; a lone
    worker answers what they handed back; nothing is lost or answered twice."""
    started = time.monotonic()
    n = chaos.count(2000, 600)
    client = await chaos.client("supervisor_sigterm")
    await client.collect_replies()
    await client.collect_dead_letters()
    supervisor, b = chaos.worker("pod", client, processes=2).start(), chaos.worker("b", client).start()
    await supervisor.wait_ready_async()
    await b.wait_ready_async()
    consumers = _consumer_pids(supervisor)
    async with paused([*consumers, _pid(b)]):
        await client.publish_all(_requests(n, "s"))
        held = await freeze_holding(consumers, what="the supervisor's consumer processes", at_least=HELD_AT_FAULT)
        supervisor.signal(signal.SIGTERM)  # it passes SIGTERM on; each process gets it as it resumes
    rc = await supervisor.wait_async(40)
    drained = supervisor.events("worker_drained")
    counters = await _finish(client, "supervisor_sigterm", started, b)
    counters.notes.update(
        held_at_signal=held,
        exit_code=rc,
        drained=sorted(e.get("child") for e in drained),
        handed_back=sum(e["handed_back"] for e in drained),
    )
    counters.expect(rc == 0, "the supervisor exits 0 once both processes drained")
    counters.expect(sorted(e.get("child") for e in drained) == [0, 1], "both consumer processes drained")
    counters.expect(all(e["unfinished"] == 0 for e in drained), "each drain finished within its timeout")
    counters.expect(counters.duplicated == 0, "a drain answers nothing twice")
    return counters


async def scenario_child_sigkill(chaos: Chaos) -> Counters:
    """SIGKILL one of a supervisor's two consumer processes mid-load: the supervisor starts it
    again, its unacked requests are redelivered, nothing is lost, and SIGTERM still exits 0."""
    started = time.monotonic()
    n = chaos.count(2000, 600)
    client = await chaos.client("child_sigkill")
    await client.collect_replies()
    await client.collect_dead_letters()
    supervisor = await chaos.worker("pod", client, processes=2).start().wait_ready_async()
    consumers = _consumer_pids(supervisor)
    victim = consumers[0]
    async with paused(consumers):
        await client.publish_all(_requests(n, "c"))
        held = await freeze_holding([victim], what="consumer process 0", at_least=HELD_AT_FAULT)
        os.kill(victim, signal.SIGKILL)
        killed_at = client.ledger.resolved()
    died = await supervisor.wait_for_async("process_died", match={"child": 0, "pid": victim})
    restarted = await supervisor.wait_for_async("process_started", match={"child": 0}, nth=2)
    resolved = await client.ledger.wait_resolved(RESOLVE_TIMEOUT_S)
    ready_again = await supervisor.wait_readyz_async(200, 60)
    restarts = await supervisor.metric_async("qinfer_process_restarts_total")
    redelivered = await supervisor.metric_async("qinfer_redelivered_total")
    counters = await _finish(client, "child_sigkill", started, supervisor)
    rc = supervisor.returncode
    counters.notes.update(
        held_at_kill=held[0],
        resolved_at_kill=killed_at,
        redelivered=int(redelivered),
        restarts=int(restarts),
        exit_code=rc,
    )
    counters.expect(died.get("signal") == "SIGKILL", "the supervisor logged the death and its signal")
    counters.expect(restarted["pid"] != victim and restarts == 1, "the supervisor started the process again")
    counters.expect(resolved, "every request resolved after the kill")
    counters.expect(ready_again, "the pod is ready again")
    counters.expect(redelivered >= held[0] > 0, "the killed process's unacked requests were redelivered")
    counters.expect(rc == 0, "SIGTERM afterwards drains both processes and exits 0")
    return counters


async def _connection_fault(
    chaos: Chaos, name: str, inject: Callable[[list[WorkerProcess], list[int]], Awaitable[dict[str, Any]]]
) -> Counters:
    """Two workers, a load, and ``inject(workers, pids)`` while both are stopped holding deliveries.

    ``inject`` resumes them (:func:`tests.support.faults.resume`) when it needs them running; they are resumed
    after it in any case.
    """
    started = time.monotonic()
    n = chaos.count(2000, 600)
    client = await chaos.client(name)
    await client.collect_replies()
    await client.collect_dead_letters()
    workers = [chaos.worker("a", client, observable=True).start(), chaos.worker("b", client, observable=True).start()]
    for w in workers:
        await w.wait_ready_async()
    pids = [_pid(w) for w in workers]
    async with paused(pids):
        await client.publish_all(_requests(n, name[0]))
        held = await freeze_holding(pids, what="workers a and b", at_least=HELD_AT_FAULT)
        notes = await inject(workers, pids)
    notes["held_at_fault"] = held
    resolved = await client.ledger.wait_resolved(RESOLVE_TIMEOUT_S)
    redelivered = sum([await w.metric_async("qinfer_redelivered_total") for w in workers])
    notes["redelivered"] = int(redelivered)
    alive = [w.returncode is None for w in workers]
    ready_again = [await w.wait_readyz_async(200, 30) for w in workers]
    lost_consumer = sum(len(w.events("consumer_lost")) for w in workers)
    counters = await _finish(client, name, started, *workers)
    counters.notes.update(notes, consumer_lost_logged=lost_consumer)
    counters.expect(resolved, "every request resolved after the fault")
    counters.expect(all(alive), "the workers survived the fault")
    counters.expect(all(ready_again), "the workers are ready again")
    counters.expect(redelivered >= sum(held), "what the workers held when their connections went was redelivered")
    return counters


async def scenario_close_connections(chaos: Chaos) -> Counters:
    """``rabbitmqctl close_all_connections`` (in the chaos vhost) mid-load: workers reconnect."""

    async def inject(workers: list[WorkerProcess], pids: list[int]) -> dict[str, Any]:
        await chaos.broker.ctl_async("close_all_connections", "-p", CHAOS_VHOST, "chaos: closed on purpose")
        return {}

    return await _connection_fault(chaos, "close_connections", inject)


async def scenario_broker_restart(chaos: Chaos) -> Counters:
    """``rabbitmqctl stop_app; start_app`` mid-load: readiness drops during the outage, the
    workers reconnect and resume, nothing confirmed is lost."""

    async def inject(workers: list[WorkerProcess], pids: list[int]) -> dict[str, Any]:
        down = time.monotonic()
        async with chaos.broker.stopped():
            resume(pids)  # they see the broker gone, and answer /readyz
            not_ready = [await w.wait_readyz_async(503, 30) for w in workers]
        return {"not_ready_during_outage": all(not_ready), "outage_s": round(time.monotonic() - down, 1)}

    counters = await _connection_fault(chaos, "broker_restart", inject)
    counters.expect(counters.notes["not_ready_during_outage"] is True, "readiness false while the broker is down")
    return counters


async def scenario_consumer_cancel(chaos: Chaos) -> Counters:
    """The request queue is deleted (the broker cancels the consumer) and declared again: the
    worker consumes again and answers what is published afterwards."""
    started = time.monotonic()
    half = chaos.count(500, 200)
    client = await chaos.client("consumer_cancel")
    await client.collect_replies()
    await client.collect_dead_letters()
    w = await chaos.worker("a", client).start().wait_ready_async()
    await client.publish_all(_requests(half, "c"))
    first = await client.ledger.wait_resolved(60)
    await client.delete_request_queue()
    # The worker declares the queue again and consumes; publishing before that would be unroutable.
    not_ready = await w.wait_readyz_async(503, 10)
    ready_again = await w.wait_readyz_async(200, 30)
    await client.publish_all(_requests(half, "d", seed=1))
    counters = await _finish(client, "consumer_cancel", started, w)
    counters.notes.update(not_ready_seen=not_ready, consumer_lost_logged=len(w.events("consumer_lost")))
    counters.expect(first, "the first half was answered before the queue was deleted")
    counters.expect(ready_again, "the worker declared the queue again and was ready")
    return counters


async def scenario_poison_exception(chaos: Chaos) -> Counters:
    """One request among 200 makes the model raise: bisection gives it the only error reply."""
    started = time.monotonic()
    client = await chaos.client("poison_exception")
    await client.collect_replies()
    await client.collect_dead_letters()
    # All queued before the worker starts, so the poison shares batches with good requests.
    await client.publish_all(_requests(200, "p", width=4, special={100: POISON_VALUE}))
    w = await chaos.worker("a", client, "poison").start().wait_ready_async()
    counters = await _finish(client, "poison_exception", started, w)
    counters.expect(client.ledger.replies.get("p100") == "inference_failed", "the poison got inference_failed")
    counters.expect((counters.replied_ok, counters.replied_error) == (199, 1), "199 results and one error reply")
    return counters


async def scenario_poison_crash(chaos: Chaos) -> Counters:
    """One request among 201 aborts the worker process each time it runs: after the delivery
    limit it is dead-lettered; the 200 others are answered."""
    started = time.monotonic()
    limit = 3
    client = await chaos.client("poison_crash", delivery_limit=limit)
    await client.collect_replies()
    await client.collect_dead_letters()
    await client.publish_all(_requests(201, "q", width=4, special={100: CRASH_VALUE}))
    supervisor = Supervisor(chaos.worker("a", client, "affine", crash_on=CRASH_VALUE)).start()
    resolved = await client.ledger.wait_resolved(RESOLVE_TIMEOUT_S)
    await supervisor.stop()
    counters = client.ledger.counters("poison_crash")
    counters.elapsed_s = time.monotonic() - started
    counters.notes.update(crashes=supervisor.crashes, delivery_limit=limit)
    counters.expect(resolved, "every request resolved")
    counters.expect(client.ledger.dead.get("q100") == "delivery_limit", "the crashing request was dead-lettered")
    counters.expect(counters.replied_ok == 200 and counters.dead_lettered == 1, "200 results, one dead letter")
    return counters


async def scenario_deadlines(chaos: Chaos) -> Counters:
    """Expired requests are never computed: the broker dead-letters those that expire while queued,
    the worker answers deadline_exceeded for those past their deadline header on arrival."""
    started = time.monotonic()
    n = 100
    client = await chaos.client("deadlines")
    await client.collect_replies()
    await client.collect_dead_letters()
    now_ms = int(time.time() * 1000)
    for cid, body, ct in _requests(n, "e", width=4):
        await client.publish(cid, body, ct, expiration_s=0.2, deadline_ms=now_ms + 200)
    expired = await client.ledger.wait_for(lambda: len(client.ledger.dead) >= n, 30)
    for cid, body, ct in _requests(n, "l", width=4, seed=1):
        await client.publish(cid, body, ct, deadline_ms=now_ms - 1000)
    await client.publish_all([(cid, body, ct) for cid, body, ct in _requests(n, "g", width=4, seed=2)])
    w = await chaos.worker("a", client, "affine").start().wait_ready_async()
    await client.ledger.wait_resolved(RESOLVE_TIMEOUT_S)
    rows_computed = await w.metric_async("qinfer_rows_total")
    counters = await _finish(client, "deadlines", started, w)
    late = [v for k, v in client.ledger.replies.items() if k.startswith("l")]
    expected_rows = _rows(_requests(n, "g", width=4, seed=2))
    counters.notes.update(rows_computed=int(rows_computed), rows_in_time=expected_rows)
    counters.expect(expired, "the broker dead-lettered the requests that expired while queued")
    counters.expect(all(v == "expired" for k, v in client.ledger.dead.items() if k.startswith("e")), "reason expired")
    counters.expect(len(late) == n and set(late) == {"deadline_exceeded"}, "late requests got deadline_exceeded")
    counters.expect(rows_computed == expected_rows, "only the requests within their deadline were computed")
    return counters


def _rows(requests: list[tuple[str, bytes, str]]) -> int:
    from producer.wire.protocol import decode_request

    return sum(decode_request(body, ct).rows for _, body, ct in requests)


async def scenario_backpressure(chaos: Chaos) -> Counters:
    """The results queue is full (max-length, reject-publish): the worker holds the requests
    unacked and publishes their replies again once there is room; none is acked unanswered."""
    started = time.monotonic()
    n = 300
    client = await chaos.client(
        "backpressure",
        results_arguments={"x-queue-type": "quorum", "x-max-length": 50, "x-overflow": "reject-publish"},
    )
    await client.collect_dead_letters()
    w = await chaos.worker("a", client, "affine").start().wait_ready_async()
    await client.publish_all(_requests(n, "b", width=4))
    deadline = time.monotonic() + 30
    held = 0.0
    while time.monotonic() < deadline and held == 0:  # probe the worker's metrics, as Prometheus would
        held = await w.metric_async("qinfer_requests_total", outcome="reply_held")
        await asyncio.sleep(0.05)
    unacked_while_full = await client.queue_depth(client.queue)
    await client.collect_replies()  # room again
    counters = await _finish(client, "backpressure", started, w)
    counters.notes.update(replies_held=int(held), requests_left_while_full=unacked_while_full)
    counters.expect(held > 0, "the broker refused replies and the worker held them")
    counters.expect(counters.replied_ok == n and counters.dead_lettered == 0, "every request answered once room came")
    return counters


async def scenario_mixed(chaos: Chaos) -> Counters:
    """A mixed load with 10 % invalid bodies from a fixed corpus: every request accounted for."""
    started = time.monotonic()
    n = chaos.count(10_000, 2_000)
    client = await chaos.client("mixed")
    await client.collect_replies()
    await client.collect_dead_letters()
    a, b = chaos.worker("a", client, "affine_256"), chaos.worker("b", client, "affine_256")
    for w in (a, b):
        await w.start().wait_ready_async()
    valid = iter(_requests(n - n // 10, "m", width=256))
    expected: dict[str, str] = {}
    requests = []
    for i in range(n):
        if i % 10 == 9:
            code, body, ct = INVALID_BODIES[(i // 10) % len(INVALID_BODIES)]
            cid = f"bad{i}"
            expected[cid] = code
            requests.append((cid, body, ct))
        else:
            requests.append(next(valid))
    await client.publish_all(requests)
    counters = await _finish(client, "mixed", started, a, b)
    wrong = [cid for cid, code in expected.items() if client.ledger.replies.get(cid) != code]
    counters.notes.update(invalid=len(expected), wrong_codes=len(wrong))
    counters.expect(not wrong, "each invalid request got its own error code")
    counters.expect(counters.replied_error == len(expected), "only the invalid requests got errors")
    counters.expect(counters.duplicated == 0, "no fault, so no duplicate")
    return counters


async def scenario_unreachable(chaos: Chaos) -> Counters:
    """No broker at start: the worker retries for WORKER_CONNECT_TIMEOUT_S, then exits non-zero."""
    started = time.monotonic()
    client = await chaos.client("unreachable")
    url = f"amqp://guest:guest@127.0.0.1:{_free_port()}/"
    w = chaos.worker("a", client, "affine", amqp_url=url, connect_timeout_s=2).start()
    rc = await w.wait_async(60)
    counters = Counters("unreachable_at_start", elapsed_s=time.monotonic() - started)
    failed = w.events("worker_failed")
    counters.notes.update(exit_code=rc, exit_after_s=round(counters.elapsed_s, 1))
    counters.expect(rc == 1, "exits 1")
    counters.expect(bool(failed) and "no RabbitMQ answered" in failed[-1].get("error", ""), "says why")
    return counters


Scenario = Callable[[Chaos], Awaitable[Counters]]
SCENARIOS: dict[str, tuple[Scenario, set[str]]] = {
    # name: (scenario, needs): needs "ctl" (rabbitmqctl) and/or BROKER_RESTART (opt-in)
    "sigkill": (scenario_sigkill, set()),
    "sigterm": (scenario_sigterm, set()),
    "supervisor_sigterm": (scenario_supervisor_sigterm, set()),
    "child_sigkill": (scenario_child_sigkill, set()),
    "broker_restart": (scenario_broker_restart, {"ctl", BROKER_RESTART}),
    "close_connections": (scenario_close_connections, {"ctl"}),
    "consumer_cancel": (scenario_consumer_cancel, set()),
    "poison_exception": (scenario_poison_exception, set()),
    "poison_crash": (scenario_poison_crash, set()),
    "deadlines": (scenario_deadlines, set()),
    "backpressure": (scenario_backpressure, set()),
    "mixed": (scenario_mixed, set()),
    "unreachable_at_start": (scenario_unreachable, set()),
}


async def run_scenario(chaos: Chaos, name: str) -> Counters:
    """Run one scenario in its own session (workers stopped and queues deleted afterwards)."""
    scenario, _needs = SCENARIOS[name]
    async with chaos.session():
        try:
            return await scenario(chaos)
        except NotHolding as e:
            return Counters(name, failures=[str(e)])


def _copy_logs(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for log in source.glob("*.log"):
        shutil.copy(log, target)


async def _main(args: argparse.Namespace) -> int:
    # The client's own reconnects are part of the faults; their tracebacks are noise here.
    logging.basicConfig(level=logging.WARNING)
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    base_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    broker = Broker.prepare(base_url)
    names = args.scenarios or list(SCENARIOS)
    rows: list[Counters] = []
    with tempfile.TemporaryDirectory(prefix="qinfer-chaos-") as tmp:
        chaos = Chaos(broker, Path(tmp), quick=args.quick)
        for name in names:
            needs = SCENARIOS[name][1]
            if "ctl" in needs and broker.ctl is None:
                print(f"{name}: skipped (needs rabbitmqctl for a local broker)", file=sys.stderr)
                continue
            if BROKER_RESTART in needs and not args.broker_restart:
                print(f"{name}: skipped (disrupts every client of the broker; pass --broker-restart)", file=sys.stderr)
                continue
            print(f"{name}: running", file=sys.stderr)
            counters = await run_scenario(chaos, name)
            rows.append(counters)
            if counters.failures:
                print(f"{name}: FAILED: {'; '.join(counters.failures)}", file=sys.stderr)
            if args.keep_logs:
                _copy_logs(Path(tmp), Path(args.keep_logs))
    print(format_table(rows))
    return 0 if all(c.passed for c in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.harness", description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=f"default: all of {', '.join(SCENARIOS)}")
    parser.add_argument("--quick", action="store_true", help="smaller request counts (the pytest sizes)")
    parser.add_argument("--broker-restart", action="store_true", help="also run stop_app/start_app (disruptive)")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the worker logs here")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - SCENARIOS.keys()
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
