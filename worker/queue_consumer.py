"""The consumer on the request queue: its connection and channel, the prefetch window, and the watch behind readiness.

Owns the consume connection (separate from the replier's, so a publisher blocked by a broker alarm never
stalls acks), the queue's declaration and consumer tag, and the prefetch window. The window starts at one
delivery and opens to ``prefetch`` at the first request delivered for the first time. Redelivered requests
("suspects", possibly what crashed the last worker) shrink it to one until none is left, so a request that
kills the process takes no innocent neighbour's delivery count along. RabbitMQ applies a consumer's prefetch
when it starts, so changing the window means consuming again.

Called by the worker (start, cancel, close) and by intake through its delivery hooks; calls aio-pika and
``worker.broker``. Reads the settler's ledger to tell a stalled window apart from a busy one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq.exceptions
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from producer.amqp.tasks import TaskSet
from worker.broker import connect, declare_request_queue
from worker.health import HealthState
from worker.jobs import Job
from worker.settings import Settings
from worker.settler import Settler

log = structlog.get_logger("worker")

_CONSUMER_CHECK_S = 0.25  # how often readiness checks that the broker still has our consumer
_CLOSE_TIMEOUT_S = 5.0  # longest a consumer cancel or connection close may take while draining
_START_ATTEMPTS = 5  # tries at starting to consume (see QueueConsumer.start)


class QueueConsumer:
    """Consumes the request queue through a prefetch window and keeps ``health.consuming`` and ``health.stalled`` true.

    :meth:`start` names what each delivery is handed to (intake).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        health: HealthState,
        tasks: TaskSet,
        settler: Settler,
    ) -> None:
        self._settings = settings
        self._health = health
        self._tasks = tasks
        self._settler = settler
        self._on_message: Callable[[AbstractIncomingMessage], Awaitable[None]] | None = None
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self.queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._window = 1  # the prefetch wanted now
        self._consumer_window = 0  # the prefetch the current consumer was started with
        self._window_lock = asyncio.Lock()
        self._suspects_open = 0

    async def start(self, on_message: Callable[[AbstractIncomingMessage], Awaitable[None]]) -> None:
        """Connect, declare the queue and hand its deliveries to ``on_message``, one at a time to begin with.

        Workers starting together on a queue that does not exist yet race to create it: RabbitMQ 3.10 can
        answer a consume on a quorum queue still being set up with ``INTERNAL_ERROR``, closing the
        connection. That is retried a few times with a short backoff; anything else stops the start.
        """
        self._on_message = on_message
        retrying = AsyncRetrying(
            stop=stop_after_attempt(_START_ATTEMPTS),
            wait=wait_exponential(multiplier=0.2, max=2),
            retry=retry_if_exception_type(aiormq.exceptions.ConnectionInternalError),
            reraise=True,
            before_sleep=lambda state: log.warning(
                "consume_start_retried",
                queue=self._settings.queue,
                attempt=state.attempt_number,
                why="the broker closed the connection while the queue was being set up",
            ),
        )
        async for attempt in retrying:
            with attempt:
                await self._open(on_message)
        self._health.consuming = True
        self._watcher = asyncio.create_task(self._watch(), name="consumer-watch")

    async def _open(self, on_message: Callable[[AbstractIncomingMessage], Awaitable[None]]) -> None:
        """One try at connecting, declaring and consuming; a failed try leaves no connection behind."""
        s = self._settings
        connection = await connect(
            s.amqp_url, timeout_s=s.connect_timeout_s, name="qinfer-worker-consume", tls_options=s.tls
        )
        try:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=self._window)
            queue = await declare_request_queue(channel, s)
            self._consumer_tag = await queue.consume(on_message)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), _CLOSE_TIMEOUT_S)
            raise
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        self._connection, self._channel, self.queue = connection, channel, queue
        self._consumer_window = self._window

    async def cancel(self) -> None:
        """Stop taking deliveries (the drain); what is unacked stays ours to settle."""
        if self.queue is not None and self._consumer_tag is not None:
            try:
                await asyncio.wait_for(self.queue.cancel(self._consumer_tag), _CLOSE_TIMEOUT_S)
            except Exception as e:  # the channel may already be gone; the broker requeues on close
                log.debug("consumer_cancel_failed", error=repr(e))

    async def close(self) -> None:
        """Stop the watch and close the connection (the broker requeues whatever is still unacked)."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self._connection is not None and not self._connection.is_closed:
            try:
                await asyncio.wait_for(self._connection.close(), _CLOSE_TIMEOUT_S)
            except Exception as e:  # a broker that is down cannot answer the close handshake
                log.debug("close_failed", error=repr(e))
        self._health.consuming = False

    # Delivery hooks (intake calls these; the settler calls release)

    def isolate_suspects(self) -> None:
        """A redelivered request arrived: shrink the window to one delivery until none is left."""
        self._suspects_open += 1
        if self._window != 1:
            log.info("isolating_redelivered", queue=self._settings.queue, prefetch=1)
            self._window = 1
            self._tasks.spawn(self._set_window(1))

    def open_window(self) -> None:
        """A first-time delivery arrived: open the window fully once no suspect is left."""
        if self._window != self._settings.prefetch and self._suspects_open == 0:
            self._window = self._settings.prefetch
            self._tasks.spawn(self._set_window(self._settings.prefetch))

    def release(self, job: Job) -> None:
        """A delivery left the worker (settled, or gone with its channel)."""
        if job.suspect:
            self._suspects_open -= 1

    # Readiness

    def _on_connection_lost(self, *_: Any) -> None:
        self._health.consuming = False
        if self._health.draining:
            return  # our own close
        log.warning("broker_connection_lost", queue=self._settings.queue)

    def _on_reconnected(self, *_: Any) -> None:
        self._health.consuming = not self._health.draining
        log.info("broker_reconnected", queue=self._settings.queue)

    async def _watch(self) -> None:
        """Keep readiness true only while the broker has our consumer, and log when that changes.

        The robust connection restores the channel and the consumer after a lost connection, and
        after a consumer cancel sent by the broker (its queue was deleted: the queue is declared
        again with the same arguments). This notices both, however they end.
        """
        while True:
            await asyncio.sleep(_CONSUMER_CHECK_S)
            if not self._health.draining and (self._consumer_tag is None or self._consumer_window != self._window):
                await self._set_window(self._window)  # a window change was cut short by a lost connection
            self._check_stalled()
            consuming = await self._registered()
            if self._health.draining or consuming == self._health.consuming:
                continue
            self._health.consuming = consuming
            if consuming:
                log.info("consumer_restored", queue=self._settings.queue)
            else:
                log.warning("consumer_lost", queue=self._settings.queue, why="connection, channel or consumer gone")

    def _check_stalled(self) -> None:
        """Readiness false while the prefetch window is full and nothing has settled for ``stall_s``.

        A worker in that state receives nothing more: whatever holds its window (a stuck model
        run, replies the broker keeps refusing) must be looked at, and a rollout must not count it.
        """
        unacked = len(self._settler.ledger)
        idle_s = time.monotonic() - self._settler.last_settled_s
        window_full = self._consumer_window > 0 and unacked >= self._consumer_window
        stalled = window_full and idle_s > self._settings.stall_s
        if stalled == self._health.stalled:
            return
        self._health.stalled = stalled
        if stalled:
            log.warning(
                "worker_stalled",
                unacked=unacked,
                idle_s=round(idle_s, 1),
                why="the prefetch window is full and nothing settled; readiness is false until something does",
            )
        else:
            log.info("worker_unstalled", unacked=unacked)

    async def _registered(self) -> bool:
        conn, channel = self._connection, self._channel
        if conn is None or conn.is_closed or channel is None or channel.is_closed:
            return False
        try:
            underlay = await channel.get_underlay_channel()
        except aiormq.exceptions.ChannelInvalidStateError:
            return False
        consumers: dict[str, Any] = getattr(underlay, "consumers", {})
        return not underlay.is_closed and self._consumer_tag in consumers

    async def _set_window(self, prefetch: int) -> None:
        """Consume again with ``prefetch``: RabbitMQ applies a consumer's prefetch when it starts.

        Deliveries the old consumer received stay ours, unacked, and are settled as usual.
        """
        async with self._window_lock:
            if self.queue is None or self._channel is None or self._on_message is None or self._health.draining:
                return
            if self._consumer_tag is not None and self._consumer_window == prefetch:
                return
            try:
                if self._consumer_tag is not None:
                    await self.queue.cancel(self._consumer_tag)
                    self._consumer_tag = None
                await self._channel.set_qos(prefetch_count=prefetch)
                self._consumer_tag = await self.queue.consume(self._on_message)
                self._consumer_window = prefetch
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as e:
                # The watcher tries again once the connection is back.
                log.warning("window_change_failed", prefetch=prefetch, error=repr(e))
                return
            if self._health.draining:  # drain began meanwhile: this consumer must not take work
                with contextlib.suppress(Exception):
                    await self.queue.cancel(self._consumer_tag)
