"""``worker coldstart``: how long a fresh worker process takes to answer, phase by phase.

Spawns ``worker run`` on a queue of its own (as a pod starting from nothing would), reads the start
marks the worker logs with ``worker_started`` (wall clock: imports done, session created, warmed,
consuming), sends one request the moment it consumes and times its reply, then stops the worker with
SIGTERM (drain) and deletes the queue. The phases:

* ``interpreter_and_imports``: process spawn to the worker object (Python, numpy, ONNX Runtime, aio-pika);
* ``session``: loading the model into an ONNX Runtime session (graph optimization included);
* ``warm_up``: the warm-up runs (see ``worker.runner``);
* ``connect``: opening the reply connection and starting the consumer;
* ``first_reply``: the first request's round trip through the broker.

The median of ``--runs`` runs, the phase that dominates, and the total (spawn to first reply: the
pod start delay ``producer plan`` uses, on top of the image pull and scheduling a cluster adds) go
to stdout and, with ``--out``, into a JSON file's ``cold_start`` section (the file ``worker
calibrate --out`` writes; other sections are kept).

:func:`phases` and :func:`summarize` are pure; :func:`measure_once` does the I/O. Called by
``worker.cli``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PHASES = ("interpreter_and_imports", "session", "warm_up", "connect", "first_reply")


class ColdStartError(RuntimeError):
    """Raised when the worker under measurement exits or stays silent before it answers."""


def phases(spawned_at: float, marks: Mapping[str, float], replied_at: float) -> dict[str, float]:
    """Seconds per phase from the spawn time, the worker's ``startup_at`` marks and the reply time
    (all wall clock, seconds since the epoch)."""
    points = [spawned_at, marks["imports_done"], marks["session_created"], marks["warmed"], marks["consuming"]]
    points.append(replied_at)
    return {name: max(0.0, b - a) for name, a, b in zip(PHASES, points[:-1], points[1:], strict=True)}


def summarize(runs: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """The median of each phase over ``runs``, the total, and the phase that dominates."""
    median = {name: statistics.median(r[name] for r in runs) for name in PHASES}
    total = sum(median.values())
    dominant = max(median, key=lambda name: median[name])
    return {
        "runs": [dict(r) for r in runs],
        "median_s": median,
        "total_s": total,
        "dominant": dominant,
        "dominant_share": median[dominant] / total if total > 0 else 0.0,
    }


def merge_into(path: Path, section: Mapping[str, Any]) -> None:
    """Write ``section`` as the ``cold_start`` key of the JSON file at ``path``, keeping its other keys."""
    data: dict[str, Any] = {}
    if path.exists():
        with contextlib.suppress(ValueError):
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                data = loaded
    data["cold_start"] = dict(section)
    path.write_text(json.dumps(data, indent=2) + "\n")


async def _read_until_started(stream: asyncio.StreamReader, timeout_s: float) -> dict[str, Any]:
    """The ``worker_started`` event from the worker's JSON log lines."""
    deadline = time.monotonic() + timeout_s
    tail: list[str] = []
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            raw = await asyncio.wait_for(stream.readline(), remaining)
        except TimeoutError:
            break
        if not raw:
            raise ColdStartError("the worker exited before it consumed; its last lines:\n" + "\n".join(tail[-10:]))
        line = raw.decode(errors="replace").rstrip("\n")
        tail.append(line)
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "worker_started":
                return event
    raise ColdStartError(f"the worker did not consume within {timeout_s:g} s")


async def _round_trip(amqp_url: str, queue: str, inputs: Mapping[str, Any], timeout_s: float) -> None:
    """Send one request over direct reply-to and wait for its reply (the worker's wire contract, no client)."""
    import aio_pika

    from producer.amqp.messages import request_message
    from producer.wire.names import CONTENT_TYPE_MSGPACK, DIRECT_REPLY_TO
    from producer.wire.protocol import encode_request

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        reply_queue = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await reply_queue.consume(replies.put, no_ack=True)
        body = encode_request(inputs, CONTENT_TYPE_MSGPACK)
        message = request_message(
            body, request_id=uuid.uuid4().hex, content_type=CONTENT_TYPE_MSGPACK, reply_to=DIRECT_REPLY_TO,
            timeout_s=timeout_s,
        )  # fmt: skip
        await channel.default_exchange.publish(message, routing_key=queue)
        try:
            await asyncio.wait_for(replies.get(), timeout_s)
        except TimeoutError:
            raise ColdStartError(f"no reply within {timeout_s:g} s after the worker consumed") from None


async def _drain_stream(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def measure_once(
    model: Path,
    inputs: Mapping[str, Any],
    *,
    amqp_url: str,
    extra_args: Sequence[str] = (),
    timeout_s: float = 300.0,
) -> dict[str, float]:
    """One cold start of ``worker run`` on ``model``: seconds per phase (see :data:`PHASES`).

    Args:
        model: ONNX file or model folder.
        inputs: the request sent once the worker consumes (input name to array or list of strings).
        amqp_url: broker the worker consumes from.
        extra_args: more ``worker run`` flags.
        timeout_s: longest wait for the worker to consume, and for its reply.

    Raises:
        ColdStartError: the worker exited or did not consume in time.
    """
    import aio_pika

    queue = f"coldstart-{uuid.uuid4().hex[:12]}"
    command = [sys.executable, "-m", "worker.cli", "run", "--model", str(model), "--queue", queue]
    command += ["--log-format", "json", "--http-port", "0", *extra_args]
    env = {**os.environ, "AMQP_URL": amqp_url}
    spawned_at = time.time()
    process = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    drain: asyncio.Task[None] | None = None
    try:
        started = await _read_until_started(process.stderr, timeout_s)
        drain = asyncio.create_task(_drain_stream(process.stderr))
        await _round_trip(amqp_url, queue, inputs, timeout_s)
        replied_at = time.time()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
                await process.wait()
        if drain is not None:
            await drain
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(queue, if_unused=False, if_empty=False)
    return phases(spawned_at, started["startup_at"], replied_at)
