"""The worker: wires intake, scheduler, runner, replies and settler, and owns the life cycle.

One consume connection (QoS = prefetch window) and the replier's publish connection, so a publisher
blocked by a broker alarm never stalls acks. This module owns what belongs to the consumer as a
whole: start (load and warm the model, connect, declare, consume), the prefetch window (slow start,
suspects alone), the consumer watch behind readiness, the drain on SIGTERM and the close.

The flow of one request, module by module::

    intake.Intake.on_message   reply_to, deadline and size checks; decode and prepare
      -> scheduler.Scheduler   batches of compatible rows; expired requests skipped
      -> runner.ModelRunner    the model, inline or in its thread, failures isolated per request
      -> replies.Replies       result or error replies, published by replier.Replier
      -> settler.Settler       ack / requeue / dead-letter per acks.ack_action

Called by ``worker.cli`` and the tests; calls the modules above and ``worker.broker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from typing import Any

import aiormq.exceptions
import structlog
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from opentelemetry.trace import TracerProvider

from producer.tls import is_tls_url
from producer.urls import redact_url
from worker.acks import Outcome
from worker.broker import connect, declare_request_queue
from worker.health import HealthState, start_http_server
from worker.intake import Intake
from worker.jobs import Job
from worker.metrics import WorkerMetrics
from worker.model import Pipeline
from worker.replier import Replier
from worker.replies import Replies
from worker.runner import ModelRunner
from worker.scheduler import Scheduler
from worker.settings import Settings
from worker.settler import Settler
from worker.tasks import TaskSet
from worker.tracing import WorkerTracing

log = structlog.get_logger("worker")

_CONSUMER_CHECK_S = 0.25  # how often readiness checks that the broker still has our consumer
_CLOSE_TIMEOUT_S = 5.0  # longest a consumer cancel or connection close may take while draining


@dataclasses.dataclass(slots=True)
class _Parts:
    """The pieces that exist once the model is warm."""

    pipeline: Pipeline
    replies: Replies
    scheduler: Scheduler
    intake: Intake


class Worker:
    """Consumes one request queue with one model until stopped.

    Args:
        settings: validated settings.
        pipeline: an already loaded model (tests share one); loaded from ``settings.model`` if None.
        install_signal_handlers: drain on SIGTERM/SIGINT; off when a caller drives shutdown itself.
        tracer_provider: where the worker's spans go (default: the global OpenTelemetry provider).
    """

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline | None = None,
        *,
        install_signal_handlers: bool = True,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.install_signal_handlers = install_signal_handlers
        self.metrics = WorkerMetrics()
        self.health = HealthState()
        self.stop_event = asyncio.Event()
        self.consuming_event = asyncio.Event()
        self._tasks = TaskSet()
        self._tracing = WorkerTracing(settings.queue, tracer_provider)
        self._runner = ModelRunner()
        self._replier = Replier(settings.amqp_url, connect_timeout_s=settings.connect_timeout_s, tls=settings.tls)
        self._settler = Settler(self.metrics, on_hold=self._on_hold, on_release=self._on_release)
        self._parts: _Parts | None = None
        self._consume_conn: AbstractRobustConnection | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._channel: AbstractChannel | None = None
        self._watcher: asyncio.Task[None] | None = None
        # Slow start: the window opens to ``prefetch`` at the first request delivered for the first
        # time. Redelivered requests ("suspects", possibly what crashed the last worker) shrink it to
        # one, so a request that kills the process takes no innocent neighbour's delivery count along.
        self._window = 1  # the prefetch wanted now
        self._consumer_window = 0  # the prefetch the current consumer was started with
        self._window_lock = asyncio.Lock()
        self._suspects_open = 0

    @property
    def batches_run(self) -> int:
        """Model runs so far."""
        return self._parts.scheduler.batches_run if self._parts else 0

    @property
    def rows_run(self) -> int:
        """Rows computed so far."""
        return self._parts.scheduler.rows_run if self._parts else 0

    # ------------------------------------------------------------------------------------------
    # Life cycle

    async def run(self) -> None:
        """Start, consume until SIGTERM/SIGINT, ``stop_event`` or (with exit_when_idle) an empty queue,
        then drain and close."""
        loop = asyncio.get_running_loop()
        if self.install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop_event.set)
        http = (
            await start_http_server(self.health, self.metrics.registry, self.settings.http_port)
            if self.settings.http_port
            else None
        )
        try:
            parts = await self._start()
            batcher = asyncio.create_task(parts.scheduler.run(), name="batch-loop")
            stopper = asyncio.create_task(self.stop_event.wait(), name="stop-wait")
            await asyncio.wait({batcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if batcher.done():
                batcher.result()
            await self._drain(parts, batcher)
        finally:
            await self._close()
            if http is not None:
                await http.cleanup()
            self._runner.shutdown()
            if self._parts is not None:
                self._parts.intake.shutdown()
            if self.install_signal_handlers:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    def _wire(self, pipeline: Pipeline) -> _Parts:
        """Build the request path around a warm model."""
        s = self.settings
        replies = Replies(
            replier=self._replier,
            settler=self._settler,
            tasks=self._tasks,
            metrics=self.metrics,
            health=self.health,
            stop_event=self.stop_event,
            model_name=pipeline.name,
            model_version=pipeline.version,
            reply_hold_s=s.reply_hold_s,
        )
        scheduler = Scheduler(
            s,
            pipeline,
            runner=self._runner,
            replies=replies,
            metrics=self.metrics,
            health=self.health,
            unsettled=lambda: len(self._settler.ledger),
            queue_empty=self._queue_empty,
        )
        self._tasks.on_done = scheduler.poke
        intake = Intake(
            s,
            pipeline,
            settler=self._settler,
            replies=replies,
            scheduler=scheduler,
            tasks=self._tasks,
            metrics=self.metrics,
            health=self.health,
            on_redelivered=self._isolate_suspects,
            on_first_delivery=self._open_window,
            tracing=self._tracing,
        )
        return _Parts(pipeline, replies, scheduler, intake)

    async def _start(self) -> _Parts:
        s = self.settings
        pipeline = await self._runner.warm_up(s, self.pipeline)
        self.pipeline = pipeline
        self._parts = parts = self._wire(pipeline)
        self.health.warmed = True
        self.metrics.model.info(
            {"name": pipeline.name, "version": pipeline.version, "providers": ",".join(pipeline.providers)}
        )
        self._consume_conn = await connect(
            s.amqp_url, timeout_s=s.connect_timeout_s, name="qinfer-worker-consume", tls_options=s.tls
        )
        await self._replier.open()
        self._consume_conn.close_callbacks.add(self._on_connection_lost)
        self._consume_conn.reconnect_callbacks.add(self._on_reconnected)
        channel = await self._consume_conn.channel(publisher_confirms=False)
        self._channel = channel
        await channel.set_qos(prefetch_count=self._window)
        self._consumer_window = self._window
        self._queue = await declare_request_queue(channel, s)
        self._consumer_tag = await self._queue.consume(parts.intake.on_message)
        self.health.consuming = True
        self._watcher = asyncio.create_task(self._watch_consumer(), name="consumer-watch")
        self.consuming_event.set()
        log.info(
            "worker_started",
            model=pipeline.name,
            version=pipeline.version,
            providers=pipeline.providers,
            inputs=[spec.describe() for spec in pipeline.inputs.values()],
            outputs=[spec.describe() for spec in pipeline.outputs.values()],
            broker=redact_url(s.amqp_url),
            tls=("mutual" if s.cert_file else "on") if is_tls_url(s.amqp_url) else "off",
            queue=s.queue,
            queue_type=s.queue_type,
            max_batch_rows=s.max_batch,
            max_delay_ms=s.max_delay_ms,
            prefetch=s.prefetch,
            warm_up_ms=round(self._runner.warm_up_s * 1000, 3),
            model_runs="inline" if self._runner.inline else "model thread",
            intra_op_threads=1 if self._runner.one_thread else s.intra_op_threads or "auto",
            http_port=s.http_port or None,
        )
        return parts

    def _on_connection_lost(self, *_: Any) -> None:
        self.health.consuming = False
        if self.health.draining:
            return  # our own close
        log.warning("broker_connection_lost", queue=self.settings.queue)

    def _on_reconnected(self, *_: Any) -> None:
        self.health.consuming = not self.health.draining
        log.info("broker_reconnected", queue=self.settings.queue)

    async def _drain(self, parts: _Parts, batcher: asyncio.Task[None]) -> None:
        """Stop consuming, hand back what has not started, finish what has, within the drain timeout."""
        started = time.monotonic()
        deadline_s = started + self.settings.drain_timeout_s
        self.health.draining = True
        self.stop_event.set()  # wakes replies held for a retry: they get one last try
        if self._queue is not None and self._consumer_tag is not None:
            try:
                await asyncio.wait_for(self._queue.cancel(self._consumer_tag), _CLOSE_TIMEOUT_S)
            except Exception as e:  # the channel may already be gone; the broker requeues on close
                log.debug("consumer_cancel_failed", error=repr(e))
        handed_back = parts.scheduler.hand_back()
        await self._settler.settle([(job, Outcome.NOT_STARTED) for job in handed_back])
        # The batch computing now spawns its reply task when it finishes, so wait until no task is
        # left rather than for a snapshot of them.
        not_done: set[asyncio.Task[None]] = {batcher, *self._tasks}
        while not_done and (remaining_s := deadline_s - time.monotonic()) > 0:
            await asyncio.wait(not_done, timeout=remaining_s)
            not_done = {t for t in (batcher, *self._tasks) if not t.done()}
        for task in not_done:
            task.cancel()
        if not batcher.cancelled() and batcher.done() and batcher.exception() is not None:
            log.error("batch_loop_failed", error=repr(batcher.exception()))
        log.info(
            "worker_drained",
            handed_back=len(handed_back),
            unfinished=len(not_done),
            drain_s=round(time.monotonic() - started, 3),
        )

    async def _close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self._consume_conn is not None and not self._consume_conn.is_closed:
            try:
                await asyncio.wait_for(self._consume_conn.close(), _CLOSE_TIMEOUT_S)
            except Exception as e:  # a broker that is down cannot answer the close handshake
                log.debug("close_failed", error=repr(e))
        await self._replier.close()
        self.health.consuming = False

    async def _queue_empty(self) -> bool:
        """True when nothing is pending or in flight here and the queue holds no ready message."""
        if self._parts is None or self._parts.scheduler.pending or len(self._tasks) or len(self._settler.ledger):
            return False
        if self._queue is None:
            return False
        declared = await self._queue.channel.declare_queue(self.settings.queue, passive=True)
        return (
            (declared.declaration_result.message_count or 0) == 0
            and not self._parts.scheduler.pending
            and not len(self._settler.ledger)
        )

    # ------------------------------------------------------------------------------------------
    # Settling hooks

    def _on_hold(self, job: Job) -> None:
        assert self._parts is not None
        self._parts.replies.retry_soon(job)

    def _on_release(self, job: Job) -> None:
        if job.suspect:
            self._suspects_open -= 1

    # ------------------------------------------------------------------------------------------
    # Readiness and the prefetch window

    async def _watch_consumer(self) -> None:
        """Keep readiness true only while the broker has our consumer, and log when that changes.

        The robust connection restores the channel and the consumer after a lost connection, and
        after a consumer cancel sent by the broker (its queue was deleted: the queue is declared
        again with the same arguments). This notices both, however they end.
        """
        while True:
            await asyncio.sleep(_CONSUMER_CHECK_S)
            if not self.health.draining and (self._consumer_tag is None or self._consumer_window != self._window):
                await self._set_window(self._window)  # a window change was cut short by a lost connection
            self._check_stalled()
            consuming = await self._consumer_registered()
            if self.health.draining or consuming == self.health.consuming:
                continue
            self.health.consuming = consuming
            if consuming:
                log.info("consumer_restored", queue=self.settings.queue)
            else:
                log.warning("consumer_lost", queue=self.settings.queue, why="connection, channel or consumer gone")

    def _check_stalled(self) -> None:
        """Readiness false while the prefetch window is full and nothing has settled for ``stall_s``.

        A worker in that state receives nothing more: whatever holds its window (a stuck model
        run, replies the broker keeps refusing) must be looked at, and a rollout must not count it.
        """
        unacked = len(self._settler.ledger)
        idle_s = time.monotonic() - self._settler.last_settled_s
        window_full = self._consumer_window > 0 and unacked >= self._consumer_window
        stalled = window_full and idle_s > self.settings.stall_s
        if stalled == self.health.stalled:
            return
        self.health.stalled = stalled
        if stalled:
            log.warning(
                "worker_stalled",
                unacked=unacked,
                idle_s=round(idle_s, 1),
                why="the prefetch window is full and nothing settled; readiness is false until something does",
            )
        else:
            log.info("worker_unstalled", unacked=unacked)

    async def _consumer_registered(self) -> bool:
        conn, channel = self._consume_conn, self._channel
        if conn is None or conn.is_closed or channel is None or channel.is_closed:
            return False
        try:
            underlay = await channel.get_underlay_channel()
        except aiormq.exceptions.ChannelInvalidStateError:
            return False
        consumers: dict[str, Any] = getattr(underlay, "consumers", {})
        return not underlay.is_closed and self._consumer_tag in consumers

    def _isolate_suspects(self) -> None:
        """A redelivered request arrived: shrink the window to one delivery until none is left."""
        self._suspects_open += 1
        if self._window != 1:
            log.info("isolating_redelivered", queue=self.settings.queue, prefetch=1)
            self._window = 1
            self._tasks.spawn(self._set_window(1))

    def _open_window(self) -> None:
        """A first-time delivery arrived: open the window fully once no suspect is left."""
        if self._window != self.settings.prefetch and self._suspects_open == 0:
            self._window = self.settings.prefetch
            self._tasks.spawn(self._set_window(self.settings.prefetch))

    async def _set_window(self, prefetch: int) -> None:
        """Consume again with ``prefetch``: RabbitMQ applies a consumer's prefetch when it starts.

        Deliveries the old consumer received stay ours, unacked, and are settled as usual.
        """
        async with self._window_lock:
            if self._queue is None or self._channel is None or self.health.draining:
                return
            if self._consumer_tag is not None and self._consumer_window == prefetch:
                return
            try:
                if self._consumer_tag is not None:
                    await self._queue.cancel(self._consumer_tag)
                    self._consumer_tag = None
                await self._channel.set_qos(prefetch_count=prefetch)
                assert self._parts is not None
                self._consumer_tag = await self._queue.consume(self._parts.intake.on_message)
                self._consumer_window = prefetch
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as e:
                # The watcher tries again once the connection is back.
                log.warning("window_change_failed", prefetch=prefetch, error=repr(e))
                return
            if self.health.draining:  # drain began meanwhile: this consumer must not take work
                with contextlib.suppress(Exception):
                    await self._queue.cancel(self._consumer_tag)
