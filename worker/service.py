"""The worker: wires intake, scheduler, runner, replies and settler to the queue consumer, and owns the life cycle.

This module owns what belongs to the worker as a whole: start (load and warm the model, open the
replier's publish connection, start the queue consumer), the HTTP endpoints, the drain on SIGTERM
(stop consuming, hand back what has not started, finish what has, within the drain timeout) and the
close. The consume connection, the prefetch window and the readiness watch are ``worker.queue_consumer``'s.

The flow of one request, module by module::

    consuming.QueueConsumer    deliveries through the prefetch window
      -> intake.Intake         reply_to, deadline and size checks; decode and prepare
      -> scheduler.Scheduler   batches of compatible rows; expired requests skipped
      -> runner.ModelRunner    the model, inline or in its thread, failures isolated per request
      -> replies.Replies       result or error replies, published by replier.Replier
      -> settler.Settler       ack / requeue / dead-letter per acks.ack_action

Called by ``worker.cli`` (and ``worker.supervisor`` through it) and the tests; calls the modules above.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time

import structlog
from opentelemetry.trace import TracerProvider

from producer.amqp.tasks import TaskSet
from producer.amqp.tls import is_tls_url
from producer.amqp.urls import redact_url
from worker.acks import Outcome
from worker.answering import Replies
from worker.health import HealthState, start_http_server
from worker.intake import Intake
from worker.jobs import Job
from worker.metrics import WorkerMetrics
from worker.pipelines.tensor import Pipeline
from worker.queue_consumer import QueueConsumer
from worker.reply_publisher import Replier
from worker.runner import ModelRunner
from worker.scheduler import Scheduler
from worker.settings import Settings
from worker.settler import Settler
from worker.tracing import WorkerTracing

log = structlog.get_logger("worker")


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
        self.created_at = time.time()  # the imports are done: startup marks are measured from here
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
        self._settler = Settler(self.metrics, on_hold=self._on_hold, on_release=lambda job: self._consumer.release(job))
        self._parts: _Parts | None = None
        self._consumer = QueueConsumer(settings, health=self.health, tasks=self._tasks, settler=self._settler)

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
            on_redelivered=self._consumer.isolate_suspects,
            on_first_delivery=self._consumer.open_window,
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
        await self._replier.open()
        await self._consumer.start(parts.intake.on_message)
        self.consuming_event.set()
        consuming_at = time.time()
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
            # Wall-clock marks of the start (s since the epoch), read by ``worker coldstart``.
            startup_at={
                "imports_done": self.created_at,
                "session_created": self._runner.loaded_at or self.created_at,
                "warmed": self._runner.warmed_at,
                "consuming": consuming_at,
            },
            model_runs="inline" if self._runner.inline else "model thread",
            intra_op_threads=1 if self._runner.one_thread else s.intra_op_threads or "auto",
            http_port=s.http_port or None,
        )
        return parts

    async def _drain(self, parts: _Parts, batcher: asyncio.Task[None]) -> None:
        """Stop consuming, hand back what has not started, finish what has, within the drain timeout."""
        started = time.monotonic()
        deadline_s = started + self.settings.drain_timeout_s
        self.health.draining = True
        self.stop_event.set()  # wakes replies held for a retry: they get one last try
        await self._consumer.cancel()
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
        await self._consumer.close()
        await self._replier.close()

    async def _queue_empty(self) -> bool:
        """True when nothing is pending or in flight here and the queue holds no ready message."""
        if self._parts is None or self._parts.scheduler.pending or len(self._tasks) or len(self._settler.ledger):
            return False
        queue = self._consumer.queue
        if queue is None:
            return False
        declared = await queue.channel.declare_queue(self.settings.queue, passive=True)
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
