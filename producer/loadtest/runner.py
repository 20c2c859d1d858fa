"""The load generator's I/O: publish on a schedule, collect replies, sample the queue depth.

Queue-native, for precise timing: one connection, one channel with publisher confirms that carries the
publishes and the direct reply-to consumer (RabbitMQ requires both on the same channel), correlation ids
``<run>-<index>``, and the ``x-published-ms`` header so the worker reports time spent in the broker.
A second channel samples the queue depth with a passive declare (or the management API when given).

Latency runs from the time a request was due (see :mod:`producer.loadtest.stats`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, urlparse

import aio_pika
import aio_pika.abc
import aiohttp
import aiormq.exceptions
import msgspec

from producer.amqp.messages import request_message
from producer.amqp.publish import publish_request, resolve_target
from producer.amqp.tasks import TaskSet
from producer.amqp.tls import TlsOptions, https_context
from producer.amqp.tls import connect as tls_connect
from producer.amqp.tracing import RoundTrips
from producer.amqp.urls import connect_failure
from producer.client.coalesce import Coalescer
from producer.loadtest.profiles import Profile, send_offsets
from producer.loadtest.stats import NO_REPLY, OK, PENDING, PUBLISH_FAILED, DepthReading, Sample, timing_entry
from producer.wire.errors import BrokerTlsError, ConnectionLostError, InferenceError, PublishRefusedError
from producer.wire.names import DIRECT_REPLY_TO
from producer.wire.protocol import decode_request, encode_request
from producer.wire.rows import concat_rows

_PUBLISH_FAILURES = (PublishRefusedError, ConnectionLostError, aiormq.exceptions.AMQPError, ConnectionError)
"""A request the broker did not take: recorded as ``publish_failed``; a lost connection also stops sending."""


class LoadTestError(InferenceError):
    """Raised when a load test cannot run: no broker, no such queue, or no consumer came."""


class _ErrorPart(msgspec.Struct):
    code: str


class _ReplyHead(msgspec.Struct):
    """The parts of a reply the generator reads; the outputs are skipped, not decoded."""

    parameters: dict[str, Any] | None = None
    error: _ErrorPart | None = None


_HEAD_DECODERS: dict[str, Any] = {
    "application/msgpack": msgspec.msgpack.Decoder(_ReplyHead),
    "application/json": msgspec.json.Decoder(_ReplyHead),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """What the live view shows, taken a few times a second."""

    elapsed_s: float
    duration_s: float
    sent: int
    ok: int
    errors: int
    inflight: int
    expected: int | None
    queue_ready: int | None
    recent_latencies_ms: tuple[float, ...]


@dataclasses.dataclass(slots=True)
class RunResult:
    """What a run recorded: every request, the queue-depth readings, and when it ran."""

    samples: list[Sample]
    depth: list[DepthReading]
    started_epoch_s: float
    send_duration_s: float
    consumers: int | None
    interrupted: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Target:
    """Where to send, and how.

    Args:
        amqp_url: the broker.
        tls: for an ``amqps://`` URL: CA bundle, client certificate and key (default: the system's CAs).
        queue: the request queue (it must exist; a worker declares it).
        timeout_s: per-request deadline (``expiration`` and ``x-deadline-ms``); 0 for none.
        drain_timeout_s: after sending stops, how long to wait for the outstanding replies.
        management_url: RabbitMQ management API base URL (``http://user:pass@host:15672``) for queue depth
            (ready and unacked); None: passive declare (ready only, no stats delay).
        depth_interval_s: how often to read the queue depth.
        wait_consumers: wait until the queue has this many consumers before starting.
        wait_timeout_s: how long to wait for them.
        purge: empty the queue before starting (leftovers of an earlier run would distort this one).
    """

    amqp_url: str = dataclasses.field(repr=False)
    queue: str
    tls: TlsOptions | None = None
    timeout_s: float = 30.0
    drain_timeout_s: float = 30.0
    management_url: str | None = dataclasses.field(default=None, repr=False)
    depth_interval_s: float = 0.25
    wait_consumers: int = 0
    wait_timeout_s: float = 120.0
    purge: bool = False


class LoadRunner:
    """Runs one profile against one queue and records every request.

    Args:
        target: broker, queue and timeouts.
        profile: the load to offer.
        bodies: pre-encoded request bodies, cycled through.
        content_type: the bodies' content type.
        rows: rows per request.
        coalesce_rows: pack requests into messages of up to this many rows while earlier publishes
            await their confirms (see :mod:`producer.client.coalesce`); a packed reply answers all its requests
            alike (its outcome and timing). 1: every request is its own message.
        on_progress: called a few times a second with a :class:`Snapshot` (the live view).
        progress_interval_s: how often ``on_progress`` is called.
    """

    def __init__(
        self,
        target: Target,
        profile: Profile,
        bodies: Sequence[bytes],
        *,
        content_type: str,
        rows: int,
        coalesce_rows: int = 1,
        on_progress: Callable[[Snapshot], None] | None = None,
        progress_interval_s: float = 0.25,
    ) -> None:
        if not bodies:
            raise ValueError("bodies must not be empty")
        # Packing concatenates the bodies' tensors: decoded once here, encoded per packed message.
        self._inputs = [decode_request(b, content_type).inputs for b in bodies] if coalesce_rows > 1 else []
        self._coalescer: Coalescer[Sample] | None = (
            Coalescer(coalesce_rows, self._send_packed, rows_of=lambda s: s.rows, wanted=lambda s: s.outcome == PENDING)
            if coalesce_rows > 1
            else None
        )
        self._packs: dict[str, list[Sample]] = {}
        self.target = target
        self._destination = resolve_target(queue=target.queue)
        self.profile = profile
        self.bodies = list(bodies)
        self.content_type = content_type
        self.rows = rows
        self.on_progress = on_progress
        self.progress_interval_s = progress_interval_s
        self.run_id = uuid.uuid4().hex[:12]
        self.samples: list[Sample] = []
        self.depth: list[DepthReading] = []
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._tasks = TaskSet(on_error=self._task_failed)
        self._stop = asyncio.Event()
        self._outstanding = 0
        self._all_answered = asyncio.Event()
        self._ok = 0
        self._errors = 0
        self._recent: deque[float] = deque(maxlen=512)
        self._t0 = 0.0
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._consumers: int | None = None
        self._failure: BaseException | None = None
        self._traces = RoundTrips()

    # ------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop sending; outstanding replies are still awaited for the drain timeout."""
        self._stop.set()

    def _now(self) -> float:
        return time.monotonic() - self._t0

    async def run(self, *, handle_sigint: bool = False) -> RunResult:
        """Connect, check the queue, offer the load, wait for the replies, and return what was recorded.

        Raises:
            LoadTestError: when the broker does not answer, the queue is missing, or no consumer came.
        """
        t = self.target
        try:
            connection = await tls_connect(t.amqp_url, t.tls, client_properties={"connection_name": "qinfer-loadtest"})
        except BrokerTlsError as e:
            raise LoadTestError(str(e)) from e
        except (ConnectionError, OSError, aiormq.exceptions.AMQPConnectionError) as e:
            raise LoadTestError(connect_failure(t.amqp_url, e)) from e
        loop = asyncio.get_running_loop()
        if handle_sigint:
            loop.add_signal_handler(signal.SIGINT, self.stop)
        try:
            async with connection:
                self._consumers = await self._check_queue(connection)
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                self._channel = channel
                reply_queue = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
                await reply_queue.consume(self._on_reply, no_ack=True)
                self._t0 = time.monotonic()
                started_epoch_s = time.time()
                background = {
                    asyncio.create_task(self._sample_depth(), name="depth"),
                    asyncio.create_task(self._report_progress(), name="progress"),
                }
                try:
                    if self.profile.open_loop:
                        await self._open_loop()
                    else:
                        await self._closed_loop()
                    send_duration_s = min(self._now(), self.profile.duration_s)
                    await self._drain()
                finally:
                    for task in background:
                        task.cancel()
                    results = await asyncio.gather(*background, return_exceptions=True)
                    for result in results:
                        if isinstance(result, Exception):
                            raise result
                await self._tasks.cancel_all()
                if self._coalescer is not None:
                    await self._coalescer.close()  # requests still waiting to be packed end as no_reply
                if self._failure is not None:
                    raise self._failure
        finally:
            if handle_sigint:
                loop.remove_signal_handler(signal.SIGINT)
        for sample in self.samples:
            if sample.outcome == PENDING:
                sample.outcome = NO_REPLY
        self._emit_progress()
        return RunResult(
            samples=self.samples,
            depth=self.depth,
            started_epoch_s=started_epoch_s,
            send_duration_s=send_duration_s,
            consumers=self._consumers,
            interrupted=self._stop.is_set(),
        )

    async def _check_queue(self, connection: aio_pika.abc.AbstractConnection) -> int:
        """Make sure the queue exists (and has consumers, if asked); purge it if asked. Returns the consumers."""
        t = self.target
        deadline = time.monotonic() + t.wait_timeout_s
        while True:
            if self._stop.is_set():
                raise LoadTestError(f"interrupted while waiting for queue {t.queue!r}")
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(t.queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity as e:
                if t.wait_consumers and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)  # workers declare the queue as they start
                    continue
                raise LoadTestError(
                    f"queue {t.queue!r} does not exist; start a worker on it (`worker run --queue {t.queue}`)"
                ) from e
            consumers = queue.declaration_result.consumer_count or 0
            if consumers >= t.wait_consumers:
                break
            await channel.close()
            if time.monotonic() >= deadline:
                raise LoadTestError(
                    f"queue {t.queue!r} has {consumers} consumer(s) after {t.wait_timeout_s:g} s; "
                    f"waited for {t.wait_consumers}"
                )
            await asyncio.sleep(0.2)  # polling the broker: workers announce nothing else
        if t.purge:
            await queue.purge()
        await channel.close()
        return consumers

    # ------------------------------------------------------------------------------------------
    # Sending

    async def _open_loop(self) -> None:
        for index, due_s in enumerate(send_offsets(self.profile)):
            delay_s = due_s - self._now()
            if delay_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay_s)
            elif index % 32 == 0:
                await asyncio.sleep(0)  # behind schedule: still let replies in
            if self._stop.is_set():
                return
            sample = self._new_sample(index, due_s)
            self._tasks.spawn(self._send(sample))

    async def _closed_loop(self) -> None:
        counter = iter(range(self.profile.max_requests or 2**62))
        deadline_s = self.profile.duration_s

        async def user() -> None:
            for index in counter:
                now = self._now()
                if self._stop.is_set() or now >= deadline_s:
                    return
                sample = self._new_sample(index, now)
                waiter = asyncio.get_running_loop().create_future()
                self._waiters[index] = waiter
                await self._send(sample)
                if sample.outcome == PENDING:
                    timeout_s = self.target.timeout_s or None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(waiter), timeout_s)

        users = [asyncio.create_task(user()) for _ in range(self.profile.concurrency)]
        stopper = asyncio.create_task(self._stop.wait())
        all_users: asyncio.Future[Any] = asyncio.gather(*users, return_exceptions=True)
        try:
            await asyncio.wait(
                {stopper, all_users},
                timeout=self.profile.duration_s + (self.target.timeout_s or 0) + 1,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stopper.cancel()
            for task in users:
                task.cancel()
            for result in await asyncio.gather(*users, return_exceptions=True):
                if isinstance(result, Exception):
                    raise result

    def _new_sample(self, index: int, due_s: float) -> Sample:
        sample = Sample(index=index, scheduled_s=due_s, sent_s=self._now(), rows=self.rows)
        self.samples.append(sample)
        self._outstanding += 1
        self._all_answered.clear()
        return sample

    async def _send(self, sample: Sample) -> None:
        if self._coalescer is not None:
            self._coalescer.submit(self.target.queue, sample)
            return
        assert self._channel is not None
        t = self.target
        message = request_message(
            self.bodies[sample.index % len(self.bodies)],
            request_id=f"{self.run_id}-{sample.index}",
            content_type=self.content_type,
            reply_to=DIRECT_REPLY_TO,
            timeout_s=t.timeout_s if t.timeout_s > 0 else None,
        )
        sample.sent_s = self._now()
        self._traces.start(message, t.queue)
        try:
            await publish_request(self._channel, message, self._destination)
            sample.confirmed_s = self._now()
        except _PUBLISH_FAILURES as e:
            if sample.outcome == PENDING:
                self._finish(sample, PUBLISH_FAILED, None)
            if isinstance(e, ConnectionError | aiormq.exceptions.AMQPConnectionError):
                self.stop()

    async def _send_packed(self, samples: list[Sample]) -> None:
        """Publish ``samples`` as one message (packed when several) and await the broker's confirm."""
        assert self._channel is not None
        t = self.target
        inputs = concat_rows([self._inputs[s.index % len(self._inputs)] for s in samples])
        request_id = f"{self.run_id}-p{samples[0].index}"
        self._packs[request_id] = samples
        message = request_message(
            encode_request(inputs, self.content_type),
            request_id=request_id,
            content_type=self.content_type,
            reply_to=DIRECT_REPLY_TO,
            timeout_s=t.timeout_s if t.timeout_s > 0 else None,
        )
        sent_s = self._now()
        for sample in samples:
            sample.sent_s = sent_s
        self._traces.start(message, t.queue)
        try:
            await publish_request(self._channel, message, self._destination)
        except _PUBLISH_FAILURES as e:
            self._packs.pop(request_id, None)
            for sample in samples:
                if sample.outcome == PENDING:
                    self._finish(sample, PUBLISH_FAILED, None)
            if isinstance(e, ConnectionError | aiormq.exceptions.AMQPConnectionError):
                self.stop()
            return
        confirmed_s = self._now()
        for sample in samples:
            sample.confirmed_s = confirmed_s

    def _task_failed(self, error: BaseException) -> None:
        if self._failure is None:
            self._failure = error
            self.stop()

    # ------------------------------------------------------------------------------------------
    # Receiving

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        now = self._now()
        run_id, _, index_text = (message.correlation_id or "").rpartition("-")
        if run_id != self.run_id:
            return  # not ours (an earlier run's straggler)
        if index_text.startswith("p"):
            samples = [s for s in self._packs.pop(message.correlation_id or "", []) if s.outcome == PENDING]
        elif index_text.isdigit() and int(index_text) < len(self.samples):
            samples = [self.samples[int(index_text)]] if self.samples[int(index_text)].outcome == PENDING else []
        else:
            return
        if not samples:
            return
        self._traces.reply_arrived(message.correlation_id, message.headers)
        decoder = _HEAD_DECODERS.get(message.content_type or "")
        try:
            head = decoder.decode(message.body) if decoder is not None else None
        except msgspec.DecodeError:
            head = None
        if head is None:
            outcome, timing = "bad_reply", None
        elif head.error is not None:
            outcome, timing = head.error.code, None
        else:
            outcome, timing = OK, timing_entry(head.parameters)
        if index_text.startswith("p"):  # a packed request's span (each sample's own ends in _finish)
            self._traces.end(message.correlation_id or "", code=None if outcome == OK else outcome)
        for sample in samples:
            if timing is not None:
                sample.timing = timing
            self._finish(sample, outcome, now)

    def _finish(self, sample: Sample, outcome: str, replied_s: float | None) -> None:
        sample.outcome = outcome
        self._traces.end(f"{self.run_id}-{sample.index}", code=None if outcome == OK else outcome)
        sample.replied_s = replied_s
        if outcome == OK:
            self._ok += 1
            latency = sample.latency_ms
            if latency is not None:
                self._recent.append(latency)
        else:
            self._errors += 1
        self._outstanding -= 1
        if self._outstanding == 0:
            self._all_answered.set()
        waiter = self._waiters.pop(sample.index, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _drain(self) -> None:
        if self._outstanding == 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_answered.wait(), self.target.drain_timeout_s)

    # ------------------------------------------------------------------------------------------
    # Queue depth and progress

    async def _sample_depth(self) -> None:
        t = self.target
        if t.management_url:
            await self._sample_depth_http(t.management_url)
            return
        # Its own connection: on the publishing one, these frames would queue behind the publishes (and
        # behind the broker's flow control), so readings would stall exactly during a burst.
        depth_connection = await tls_connect(
            t.amqp_url, t.tls, client_properties={"connection_name": "qinfer-loadtest-depth"}
        )
        channel = await depth_connection.channel()
        try:
            while True:
                queue = await channel.declare_queue(t.queue, passive=True)
                result = queue.declaration_result
                self.depth.append(
                    DepthReading(t_s=self._now(), ready=result.message_count or 0, consumers=result.consumer_count)
                )
                await asyncio.sleep(t.depth_interval_s)
        finally:
            with contextlib.suppress(Exception):
                await depth_connection.close()

    async def _sample_depth_http(self, base_url: str) -> None:
        parsed = urlparse(self.target.amqp_url)
        vhost = quote(parsed.path[1:] or "/", safe="")
        base = urlparse(base_url)
        auth = aiohttp.BasicAuth(base.username or "guest", base.password or "guest")
        port = base.port or (15671 if base.scheme == "https" else 15672)
        root = f"{base.scheme}://{base.hostname}:{port}{base.path.rstrip('/')}"
        url = f"{root}/api/queues/{vhost}/{quote(self.target.queue, safe='')}"
        # Over https, the management API is verified with the same CA (and client certificate) as the broker.
        where = f"{base.hostname}:{port}"
        connector = (
            aiohttp.TCPConnector(ssl=https_context(self.target.tls or TlsOptions(), where=where))
            if base.scheme == "https"
            else None
        )
        async with aiohttp.ClientSession(
            auth=auth, timeout=aiohttp.ClientTimeout(total=5), connector=connector
        ) as session:
            while True:
                try:
                    async with session.get(url) as response:
                        response.raise_for_status()
                        info = await response.json()
                    self.depth.append(
                        DepthReading(
                            t_s=self._now(),
                            ready=int(info.get("messages_ready", 0)),
                            unacked=int(info.get("messages_unacknowledged", 0)),
                            consumers=info.get("consumers"),
                        )
                    )
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    pass  # a missed reading is a gap in the plot, not a failed run
                await asyncio.sleep(self.target.depth_interval_s)

    async def _report_progress(self) -> None:
        if self.on_progress is None:
            return
        while True:
            self._emit_progress()
            await asyncio.sleep(self.progress_interval_s)

    def _emit_progress(self) -> None:
        if self.on_progress is None:
            return
        self.on_progress(
            Snapshot(
                elapsed_s=self._now(),
                duration_s=self.profile.duration_s,
                sent=len(self.samples),
                ok=self._ok,
                errors=self._errors,
                inflight=self._outstanding,
                expected=self.profile.expected_requests(),
                queue_ready=self.depth[-1].ready if self.depth else None,
                recent_latencies_ms=tuple(self._recent),
            )
        )
