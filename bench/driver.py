"""The load driver shared by the benchmarks: one aio-pika client, N requests, W in flight.

Also starts and stops the consumer processes under test, each on its own queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import numpy as np

from producer.names import DEFAULT_AMQP_URL, DIRECT_REPLY_TO, HEADER_PUBLISHED_MS, dead_letter_queue

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


@contextlib.asynccontextmanager
async def consumer_process(argv: Sequence[str], ready_marker: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start a consumer process, wait until it prints ``ready_marker``, SIGTERM it on exit."""
    env = {**os.environ, "AMQP_URL": AMQP_URL, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=ROOT
    )
    assert proc.stdout is not None
    lines: list[str] = []
    while True:
        line = (await proc.stdout.readline()).decode()
        if not line:
            raise RuntimeError(f"{argv[0]} exited before it was ready:\n" + "".join(lines[-20:]))
        lines.append(line)
        if ready_marker in line:
            break
    drain = asyncio.create_task(proc.stdout.read())
    try:
        yield proc
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 60)
        await drain


async def delete_queues(*names: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for name in names:
            for queue in (name, dead_letter_queue(name)):
                with contextlib.suppress(Exception):
                    await channel.queue_delete(queue, if_unused=False, if_empty=False)
