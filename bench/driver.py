"""The load driver shared by the benchmarks: one aio-pika client, N requests, W in flight.

The consumer processes under test, each on its own queue, start through :mod:`tests.support.worker_process`
(``WorkerProcess`` for the worker, :func:`baseline` for the consumers it is measured against).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import numpy as np

from producer.wire.names import DEFAULT_AMQP_URL, DIRECT_REPLY_TO, HEADER_PUBLISHED_MS, dead_letter_queue
from tests.support.worker_process import LoggedProcess, child_env

AMQP_URL = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunResult:
    """What one driven run measured."""

    count: int
    elapsed_s: float
    latencies_s: list[float]
    replies: list[aio_pika.abc.AbstractIncomingMessage]

    @property
    def msgs_per_s(self) -> float:
        return self.count / self.elapsed_s

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000)


async def drive(
    queue: str, bodies: Sequence[bytes], *, content_type: str, window: int, keep_replies: bool = False
) -> RunResult:
    """Publish every body to ``queue`` keeping at most ``window`` awaiting their replies; time each."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        pending: dict[str, tuple[float, asyncio.Future[aio_pika.abc.AbstractIncomingMessage]]] = {}
        latencies: list[float] = []
        replies: list[aio_pika.abc.AbstractIncomingMessage] = []
        slots = asyncio.Semaphore(window)
        done = asyncio.Event()

        def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            started, _ = pending.pop(message.correlation_id or "", (None, None))
            if started is None:
                return
            latencies.append(time.perf_counter() - started)
            if keep_replies:
                replies.append(message)
            slots.release()
            if len(latencies) == len(bodies):
                done.set()

        async def on_reply_async(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            on_reply(message)

        reply_queue = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await reply_queue.consume(on_reply_async, no_ack=True)
        exchange = channel.default_exchange
        begin = time.perf_counter()
        for body in bodies:
            await slots.acquire()
            cid = uuid.uuid4().hex
            pending[cid] = (time.perf_counter(), asyncio.get_running_loop().create_future())
            await exchange.publish(
                aio_pika.Message(
                    body,
                    content_type=content_type,
                    correlation_id=cid,
                    reply_to=DIRECT_REPLY_TO,
                    headers={HEADER_PUBLISHED_MS: int(time.time() * 1000)},
                ),
                routing_key=queue,
                mandatory=False,
            )
        await asyncio.wait_for(done.wait(), 300)
        elapsed = time.perf_counter() - begin
    return RunResult(len(bodies), elapsed, latencies, replies)


def baseline(kind: str, queue: str, *, prefetch: int, model: Path | None = None) -> LoggedProcess:
    """A :mod:`bench.baselines` consumer process (not started) on ``queue``; ready once it logs ``ready``.

    Args:
        kind: ``echo`` or ``unbatched``.
        queue: request queue it declares and consumes.
        prefetch: its prefetch window (messages).
        model: the ONNX model (``unbatched`` only).
    """
    command = [sys.executable, "-m", "bench.baselines", kind, "--queue", queue, "--prefetch", str(prefetch)]
    if model is not None:
        command += ["--model", str(model)]
    return LoggedProcess(command, env=child_env(AMQP_URL), name=f"{kind} baseline", ready_event="ready")


async def delete_queues(*names: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for name in names:
            for queue in (name, dead_letter_queue(name)):
                with contextlib.suppress(Exception):
                    await channel.queue_delete(queue, if_unused=False, if_empty=False)
