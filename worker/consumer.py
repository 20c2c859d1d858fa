"""The worker's I/O: receive → batch → infer → reply → ack, against a real RabbitMQ.

One consume connection (QoS = prefetch window) and one publish connection (publisher confirms),
so a publisher blocked by a broker alarm never stalls acks. The model runs in a single worker
thread; the event loop keeps receiving while a batch computes, and whatever arrived meanwhile
forms the next batch. With ``max_delay_ms = 0`` (the default) a request never waits for a
batch that is not coming: batches form only while the model is busy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import re
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import aiormq
import aiormq.exceptions
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from producer.errors import ProtocolError
from producer.names import HEADER_DEADLINE_MS, HEADER_PUBLISHED_MS
from producer.protocol import (
    ErrorCode,
    InferRequest,
    decode_request,
    encode_error,
    encode_reply,
    reply_content_type,
)
from worker.acks import AckAction, AckLedger, Outcome, ack_action, reply_retry_delay_s
from worker.batching import Arrays, Batchable, pending_rows, run_isolating, take_batch
from worker.broker import connect, declare_request_queue
from worker.health import HealthState, start_http_server
from worker.metrics import WorkerMetrics
from worker.model import Pipeline, load_pipeline
from worker.replier import Published, Replier
from worker.reply_to import ReplyTo, ReplyToKind, classify
from worker.settings import Settings

log = structlog.get_logger("worker")

_IDLE_CHECK_S = 0.1  # how often an idle --exit-when-idle worker asks the broker whether the queue is empty
_CONSUMER_CHECK_S = 0.25  # how often readiness checks that the broker still has our consumer
_BATCHES_AHEAD = 2  # batches handed to the model thread at once: one running, one queued behind it
_DELIVERY_TURNS = 3  # event-loop turns a delivery read from the socket needs to reach _on_message
_CLOSE_TIMEOUT_S = 5.0  # longest a consumer cancel or connection close may take while draining
# Handing a batch to the model thread and back costs about 0.1 ms of event-loop time idle, and
# up to 1 ms at saturation on two cores, when the model thread waits for the GIL the busy loop
# holds. A model whose warm-up (one row, then a full batch) takes less than this runs inline on
# the loop: blocking it that briefly costs less than the hand-off. Anything slower runs in the model thread while the
# loop receives.
_INLINE_COMPUTE_S = 0.001
# Bodies up to this size are decoded and prepared (tokenized) on the event loop: at most a few
# milliseconds. Larger ones go to the intake thread, so a long text never stalls acks, heartbeats
# or /livez.
_INLINE_PREPARE_BYTES = 64 * 1024
# RabbitMQ's default max_message_size: a larger reply would make the broker close the channel.
_MAX_REPLY_BYTES = 128 * 1024 * 1024
_ECHO_CHARS = 200  # longest piece of a request echoed into a log line
_MAX_ERROR_CHARS = 2000  # longest error message in a reply


def _clip(value: object) -> str:
    """``str(value)``, cut to :data:`_ECHO_CHARS` characters: logs never echo a hostile field in full."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= _ECHO_CHARS else f"{text[:_ECHO_CHARS]}... ({len(text)} characters)"


def _timed_warm_up(pipeline: Pipeline, max_rows: int) -> float:
    """Seconds one warm-up pass (one row, then a full batch) takes, measured where it runs."""
    started = time.perf_counter()
    pipeline.warm_up(max_rows)
    return time.perf_counter() - started


_RunResult = tuple[list[Arrays | Exception], float, float]


def _timed_run(run: Callable[[Sequence[Any]], list[Arrays]], prepared: Sequence[Any]) -> _RunResult:
    """Run a batch with failure isolation, where it runs (loop or model thread).

    Returns the results, when the run started (``time.monotonic()``) and how long it took (s).
    """
    started = time.monotonic()
    results = run_isolating(run, prepared)
    return results, started, time.monotonic() - started


@dataclasses.dataclass(slots=True)
class Job:
    """One delivery on its way through the worker."""

    message: AbstractIncomingMessage
    ledger: AckLedger
    request_id: str
    reply_to: ReplyTo | None = None  # classified at intake; None until then
    request: InferRequest | None = None
    prepared: Any = None  # what the pipeline runs for this request (see Pipeline.prepare)
    received_s: float = 0.0  # monotonic
    deadline_ms: float | None = None  # epoch ms
    broker_ms: float | None = None
    suspect: bool = False  # delivered before: it may be what crashed a worker, so it runs alone
    reply: Reply | None = None  # kept while the broker refuses it, to publish again
    refused_since_s: float | None = None  # monotonic
    reply_attempts: int = 0


@dataclasses.dataclass(slots=True)
class Reply:
    """A reply body ready to publish for one job."""

    job: Job
    body: bytes
    content_type: str
    outcome_label: str  # "ok" or an error code, for metrics


def _open_channel(message: AbstractIncomingMessage) -> Any | None:
    """The (aiormq) channel a message came on, or None once that channel is closed."""
    try:
        channel = message.channel
    except aiormq.exceptions.ChannelInvalidStateError:
        return None
    return None if channel.is_closed else channel


def _header_ms(message: AbstractIncomingMessage, name: str) -> float | None:
    value = message.headers.get(name) if message.headers else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class Worker:
    """Consumes one request queue with one model until stopped.

    Args:
        settings: validated settings.
        pipeline: an already loaded model (tests share one); loaded from ``settings.model`` if None.
        install_signal_handlers: drain on SIGTERM/SIGINT; off when a caller drives shutdown itself.
    """

    def __init__(
        self, settings: Settings, pipeline: Pipeline | None = None, *, install_signal_handlers: bool = True
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.install_signal_handlers = install_signal_handlers
        self.metrics = WorkerMetrics()
        self.health = HealthState()
        self.stop_event = asyncio.Event()
        self.consuming_event = asyncio.Event()
        self._pending: deque[Batchable[Job]] = deque()
        self._wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ledger = AckLedger()
        self._ledger_channel: Any = None
        self._run_inline = False  # decided at warm-up: see _INLINE_COMPUTE_S
        self._warm_up_s = 0.0
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
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
        self._settle_lock = asyncio.Lock()
        self._suspects_open = 0
        self._replier = Replier(settings.amqp_url, connect_timeout_s=settings.connect_timeout_s)
        self._reply_to_pattern = re.compile(settings.reply_to_pattern)
        self._intake_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake")
        self._last_settled_s = time.monotonic()
        self.batches_run = 0
        self.rows_run = 0

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
            if (self.settings.http_port)
            else None
        )
        try:
            await self._start()
            batcher = asyncio.create_task(self._batch_loop(), name="batch-loop")
            stopper = asyncio.create_task(self.stop_event.wait(), name="stop-wait")
            await asyncio.wait({batcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if batcher.done():
                batcher.result()
            await self._drain(batcher)
        finally:
            await self._close()
            if http is not None:
                await http.cleanup()
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._intake_executor.shutdown(wait=False, cancel_futures=True)
            if self.install_signal_handlers:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    async def _start(self) -> None:
        s = self.settings
        loaded_here = self.pipeline is None
        if self.pipeline is None:
            self.pipeline = await asyncio.to_thread(load_pipeline, s)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.pipeline.warm_up, s.max_batch)
        # Timed on its second pass (the first pays for allocation and kernel choice), with nothing
        # else running: the model's own cost, decided once.
        self._warm_up_s = await loop.run_in_executor(self._executor, _timed_warm_up, self.pipeline, s.max_batch)
        self._run_inline = self._warm_up_s < _INLINE_COMPUTE_S
        on_cpu = self.pipeline.providers[0] == "CPUExecutionProvider"
        one_thread = self._run_inline and loaded_here and on_cpu and s.intra_op_threads == 0
        if one_thread:
            # A model this cheap gains nothing from ONNX Runtime's thread pool and pays, on every
            # run, for waking a pool thread that competes with the loop for the cores: one thread.
            self.pipeline = await asyncio.to_thread(load_pipeline, dataclasses.replace(s, intra_op_threads=1))
            await loop.run_in_executor(self._executor, self.pipeline.warm_up, s.max_batch)
        pipeline = self.pipeline
        self.health.warmed = True
        self.metrics.model.info(
            {"name": pipeline.name, "version": pipeline.version, "providers": ",".join(pipeline.providers)}
        )
        self._consume_conn = await connect(s.amqp_url, timeout_s=s.connect_timeout_s, name="qinfer-worker-consume")
        await self._replier.open()
        self._consume_conn.close_callbacks.add(self._on_connection_lost)
        self._consume_conn.reconnect_callbacks.add(self._on_reconnected)
        channel = await self._consume_conn.channel(publisher_confirms=False)
        self._channel = channel
        await channel.set_qos(prefetch_count=self._window)
        self._consumer_window = self._window
        self._queue = await declare_request_queue(channel, s)
        self._consumer_tag = await self._queue.consume(self._on_message)
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
            queue=s.queue,
            queue_type=s.queue_type,
            max_batch_rows=s.max_batch,
            max_delay_ms=s.max_delay_ms,
            prefetch=s.prefetch,
            warm_up_ms=round(self._warm_up_s * 1000, 3),
            model_runs="inline" if self._run_inline else "model thread",
            intra_op_threads=1 if one_thread else s.intra_op_threads or "auto",
            http_port=s.http_port or None,
        )

    def _on_connection_lost(self, *_: Any) -> None:
        self.health.consuming = False
        if self.health.draining:
            return  # our own close
        log.warning("broker_connection_lost", queue=self.settings.queue)

    def _on_reconnected(self, *_: Any) -> None:
        self.health.consuming = not self.health.draining
        log.info("broker_reconnected", queue=self.settings.queue)

    async def _drain(self, batcher: asyncio.Task[None]) -> None:
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
        handed_back = [item.item for item in self._pending]
        self._pending.clear()
        await self._settle([(job, Outcome.NOT_STARTED) for job in handed_back])
        self._wakeup.set()
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
        window_full = self._consumer_window > 0 and len(self._ledger) >= self._consumer_window
        stalled = window_full and time.monotonic() - self._last_settled_s > self.settings.stall_s
        if stalled != self.health.stalled:
            self.health.stalled = stalled
            if stalled:
                log.warning(
                    "worker_stalled",
                    unacked=len(self._ledger),
                    idle_s=round(time.monotonic() - self._last_settled_s, 1),
                    why="the prefetch window is full and nothing settled; readiness is false until something does",
                )
            else:
                log.info("worker_unstalled", unacked=len(self._ledger))

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
            self._spawn(self._set_window(1))

    def _open_window(self) -> None:
        """A first-time delivery arrived: open the window fully once no suspect is left."""
        if self._window != self.settings.prefetch and self._suspects_open == 0:
            self._window = self.settings.prefetch
            self._spawn(self._set_window(self.settings.prefetch))

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
                self._consumer_tag = await self._queue.consume(self._on_message)
                self._consumer_window = prefetch
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as e:
                # The watcher tries again once the connection is back.
                log.warning("window_change_failed", prefetch=prefetch, error=repr(e))
                return
            if self.health.draining:  # drain began meanwhile: this consumer must not take work
                with contextlib.suppress(Exception):
                    await self._queue.cancel(self._consumer_tag)

    # ------------------------------------------------------------------------------------------
    # Receive

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        """Take in one delivery. Whatever it holds, it ends settled: replied to, or dead-lettered."""
        job = self._admit(message)
        with self._answering_failures(job):
            if not self._screen(job):
                return
            if len(message.body) <= _INLINE_PREPARE_BYTES:
                request, prepared = self._decode(job)
                self._enqueue(job, request, prepared)
            else:
                self._spawn(self._take_in_off_loop(job))

    def _admit(self, message: AbstractIncomingMessage) -> Job:
        """Record a delivery in the ack ledger and make its Job."""
        if message.channel is not self._ledger_channel:
            # A new channel (first delivery, or after a reconnect): tags start again from 1.
            self._ledger_channel = message.channel
            self._ledger = AckLedger()
        assert message.delivery_tag is not None
        self._ledger.add(message.delivery_tag)
        self.metrics.inflight.inc()
        return Job(
            message=message,
            ledger=self._ledger,
            request_id=message.correlation_id or message.message_id or "",
            received_s=time.monotonic(),
        )

    @contextlib.contextmanager
    def _answering_failures(self, job: Job) -> Iterator[None]:
        """Turn anything raised while taking in ``job`` into its error reply (or dead-letter)."""
        try:
            yield
        except ProtocolError as e:
            log.warning("bad_request", request_id=_clip(job.request_id), code=e.code, error=_clip(e.message))
            self._spawn(self._reply([self._error(job, e.code, e.message)]))
        except Exception as e:  # a bug or an input nobody foresaw: answer it, never leave it unsettled
            log.error("intake_failed", request_id=_clip(job.request_id), error=_clip(e), exc_info=e)
            if job.reply_to is None:
                job.reply_to = classify(job.message.reply_to, self._reply_to_pattern)
            if job.reply_to.answerable:
                message = f"the worker could not take in this request ({type(e).__name__}); it was not computed"
                self._spawn(self._reply([self._error(job, ErrorCode.INTERNAL, message)]))
            else:
                self._spawn(self._settle([(job, Outcome.BAD_REPLY_TO)]))

    def _screen(self, job: Job) -> bool:
        """The checks that cost nothing: suspects, reply_to, draining, deadline, size.

        Returns False when the job was answered or settled here (no decoding needed).
        """
        message = job.message
        if message.redelivered:
            self.metrics.redelivered.inc()
            log.info(
                "redelivered",
                request_id=_clip(job.request_id),
                delivery_count=_clip(message.headers.get("x-delivery-count")),
            )
            job.suspect = True
            self._isolate_suspects()
        else:
            self._open_window()
        job.reply_to = classify(message.reply_to, self._reply_to_pattern)
        if not job.reply_to.answerable:
            log.warning(
                "no_reply_to" if job.reply_to.kind is ReplyToKind.MISSING else "reply_to_refused",
                request_id=_clip(job.request_id),
                reply_to=_clip(message.reply_to or ""),
                action="dead-lettered",
                why=job.reply_to.reason,
            )
            outcome = Outcome.NO_REPLY_TO if job.reply_to.kind is ReplyToKind.MISSING else Outcome.BAD_REPLY_TO
            self._spawn(self._settle([(job, outcome)]))
            return False
        if self.health.draining:
            self._spawn(self._settle([(job, Outcome.NOT_STARTED)]))
            return False
        now_ms = time.time() * 1000.0
        published_ms = _header_ms(message, HEADER_PUBLISHED_MS)
        if published_ms is not None:
            job.broker_ms = max(0.0, now_ms - published_ms)
            self.metrics.broker_seconds.observe(job.broker_ms / 1000.0)
        job.deadline_ms = _header_ms(message, HEADER_DEADLINE_MS)
        if job.deadline_ms is not None and now_ms > job.deadline_ms:
            self._spawn(self._reply([self._deadline_error(job, now_ms)]))
            return False
        size = len(message.body)
        if size > self.settings.max_message_bytes:
            raise ProtocolError(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"the request body is {size} bytes; this worker accepts at most {self.settings.max_message_bytes} "
                "(split the request into smaller ones, or raise WORKER_MAX_MESSAGE_BYTES)",
            )
        return True

    def _decode(self, job: Job) -> tuple[InferRequest, Any]:
        """Decode and prepare (validate, tokenize) a request. Pure: safe to run in the intake thread."""
        assert self.pipeline is not None
        message = job.message
        request = decode_request(message.body, message.content_type, default_id=job.request_id)
        job.request_id = request.id
        return request, self.pipeline.prepare(request, max_rows=self.settings.max_batch)

    async def _take_in_off_loop(self, job: Job) -> None:
        """Decode and prepare a large request in the intake thread, then queue it for a batch."""
        with self._answering_failures(job):
            loop = asyncio.get_running_loop()
            request, prepared = await loop.run_in_executor(self._intake_executor, self._decode, job)
            if self.health.draining:  # the drain began meanwhile and has handed back the pending work
                await self._settle([(job, Outcome.NOT_STARTED)])
                return
            self._enqueue(job, request, prepared)

    def _enqueue(self, job: Job, request: InferRequest, prepared: Any) -> None:
        """Queue a prepared request for the batch loop."""
        assert self.pipeline is not None
        deadline_ms = job.deadline_ms
        if deadline_ms is not None and (now_ms := time.time() * 1000.0) > deadline_ms:
            self._spawn(self._reply([self._deadline_error(job, now_ms)]))
            return
        job.request = request
        job.prepared = prepared
        # A suspect never shares a model run: if it kills the process, only it was computing.
        key = ("suspect", job.message.delivery_tag) if job.suspect else self.pipeline.batch_key(prepared)
        length = self.pipeline.padding_length(prepared)
        self._pending.append(Batchable(job, rows=request.rows, key=key, length=length))
        self._wakeup.set()

    # ------------------------------------------------------------------------------------------
    # Batch and compute

    async def _batch_loop(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        assert self.pipeline is not None
        run = self.pipeline.run
        # Batches handed to the model thread, oldest first. Up to _BATCHES_AHEAD: while one runs,
        # the next waits in the executor's queue, so the model never idles while the loop encodes
        # and publishes the previous batch's replies.
        computing: deque[tuple[list[Job], asyncio.Future[_RunResult]]] = deque()
        while not self.health.draining:
            if computing and (len(computing) >= _BATCHES_AHEAD or not self._pending):
                jobs, future = computing.popleft()
                self._finish_batch(jobs, await future)
                continue
            if not self._pending:
                self._wakeup.clear()
                if s.exit_when_idle:
                    if await self._idle():
                        log.info("queue_empty_exiting", queue=s.queue)
                        return
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), _IDLE_CHECK_S)
                else:
                    await self._wakeup.wait()
                continue
            if len(self._ledger) > len(self._pending) and pending_rows(self._pending) < s.max_batch:
                # Busy with other requests (computing, or replies in flight): let deliveries already
                # read from the socket reach _on_message first. A few loop turns (frame -> aiormq
                # task -> aio-pika task -> callback), no waiting on a clock; at saturation this
                # turns many tiny batches into few. A lone request skips it.
                for _ in range(_DELIVERY_TURNS):
                    await asyncio.sleep(0)
            if s.max_delay_ms > 0 and pending_rows(self._pending) < s.max_batch:
                await self._linger(self._pending[0].item.received_s + s.max_delay_ms / 1000.0)
                if self.health.draining:
                    break
            jobs = take_batch(self._pending, s.max_batch)
            now_ms = time.time() * 1000.0
            expired = [j for j in jobs if j.deadline_ms is not None and now_ms > j.deadline_ms]
            if expired:
                self._spawn(self._reply([self._deadline_error(j, now_ms) for j in expired]))
                jobs = [j for j in jobs if not (j.deadline_ms is not None and now_ms > j.deadline_ms)]
                if not jobs:
                    continue
            prepared = [j.prepared for j in jobs]
            if self._run_inline:
                self._finish_batch(jobs, _timed_run(run, prepared))
            else:
                computing.append((jobs, loop.run_in_executor(self._executor, _timed_run, run, prepared)))
        while computing:  # draining: finish what the model thread has, so its replies go out
            jobs, future = computing.popleft()
            self._finish_batch(jobs, await future)

    def _finish_batch(self, jobs: list[Job], result: _RunResult) -> None:
        """Record a finished model run and send its replies (in a task of their own)."""
        results, started, compute_s = result
        finished = time.monotonic()
        rows = sum(j.request.rows for j in jobs if j.request is not None)
        self.batches_run += 1
        self.rows_run += rows
        self.metrics.compute_seconds.observe(compute_s)
        self.metrics.batch_rows.observe(rows)
        self.metrics.batch_requests.observe(len(jobs))
        self.metrics.rows.inc(rows)
        timing = {"batch_rows": rows, "batch_requests": len(jobs), "compute_ms": round(compute_s * 1e3, 3)}
        replies = []
        for job, outputs in zip(jobs, results, strict=True):
            wait_s = started - job.received_s
            self.metrics.batch_wait_seconds.observe(wait_s)
            if isinstance(outputs, Exception):
                log.warning("inference_failed", request_id=_clip(job.request_id), error=_clip(outputs))
                replies.append(
                    self._error(
                        job, ErrorCode.INFERENCE_FAILED, f"the model failed on this request: {_clip(str(outputs))}"
                    )
                )
            else:
                replies.append(self._result(job, outputs, {**timing, "batch_wait_ms": round(wait_s * 1e3, 3)}))
        self._spawn(self._reply(replies, finished_s=finished))

    async def _linger(self, until_s: float) -> None:
        """Wait for more rows until ``until_s`` (monotonic), a full batch, or draining."""
        while pending_rows(self._pending) < self.settings.max_batch and not self.health.draining:
            remaining = until_s - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    async def _idle(self) -> bool:
        """True when nothing is pending or in flight here and the queue holds no ready message."""
        if self._pending or self._tasks or len(self._ledger) or self._queue is None:
            return False
        channel = self._queue.channel
        declared = await channel.declare_queue(self.settings.queue, passive=True)
        return (declared.declaration_result.message_count or 0) == 0 and not self._pending and not len(self._ledger)

    # ------------------------------------------------------------------------------------------
    # Reply and settle

    def _result(self, job: Job, outputs: Arrays, timing: dict[str, Any]) -> Reply:
        assert self.pipeline is not None
        if job.broker_ms is not None:
            timing["broker_ms"] = round(job.broker_ms, 3)
        content_type = reply_content_type(job.message.content_type)
        body = encode_reply(
            job.request_id,
            outputs,
            content_type,
            model_name=self.pipeline.name,
            model_version=self.pipeline.version,
            parameters={"timing": timing},
        )
        if len(body) > _MAX_REPLY_BYTES:
            return self._error(
                job,
                ErrorCode.INTERNAL,
                f"the reply would be {len(body)} bytes, more than the broker accepts ({_MAX_REPLY_BYTES}); "
                "send fewer rows per request, or ask for fewer outputs",
            )
        return Reply(job, body, content_type, "ok")

    def _error(self, job: Job, code: str, message: str) -> Reply:
        # Messages clip what they echo; this bounds the whole, whatever the raiser forgot.
        if len(message) > _MAX_ERROR_CHARS:
            message = f"{message[:_MAX_ERROR_CHARS]}... (message cut at {_MAX_ERROR_CHARS} characters)"
        content_type = reply_content_type(job.message.content_type)
        return Reply(job, encode_error(job.request_id, code, message, content_type), content_type, str(code))

    def _deadline_error(self, job: Job, now_ms: float) -> Reply:
        late_ms = now_ms - (job.deadline_ms or now_ms)
        log.info("deadline_exceeded", request_id=_clip(job.request_id), late_ms=round(late_ms, 1))
        return self._error(
            job,
            ErrorCode.DEADLINE_EXCEEDED,
            f"the request's deadline passed {late_ms:.0f} ms before it could be computed; it was not computed "
            "(give it a longer timeout, or add workers)",
        )

    async def _publish(self, reply: Reply) -> Published:
        job = reply.job
        assert job.reply_to is not None
        return await self._replier.publish(
            reply.body, content_type=reply.content_type, correlation_id=job.message.correlation_id, to=job.reply_to
        )

    async def _reply(self, replies: Sequence[Reply], finished_s: float | None = None) -> None:
        results: list[Published | BaseException]
        if len(replies) == 1:  # the common case at low load: no gather, no extra task
            results = [await self._publish(replies[0])]
        else:
            results = await asyncio.gather(*(self._publish(r) for r in replies), return_exceptions=True)
        if finished_s is not None:
            self.metrics.reply_seconds.observe(time.monotonic() - finished_s)
        settled: list[tuple[Job, Outcome]] = []
        for reply, published in zip(replies, results, strict=True):
            job = reply.job
            if published is Published.CONFIRMED:
                settled.append((job, Outcome.REPLIED))
                self.metrics.requests.labels(reply.outcome_label).inc()
            elif published is Published.REFUSED:
                now_s = time.monotonic()
                if job.refused_since_s is None:
                    job.refused_since_s = now_s
                too_long = self.health.draining or now_s - job.refused_since_s >= self.settings.reply_hold_s
                log.warning(
                    "reply_refused",
                    request_id=_clip(job.request_id),
                    reply_to=job.message.reply_to,
                    attempt=job.reply_attempts,
                    action="hand back" if too_long else "hold and retry",
                )
                job.reply = reply
                settled.append((job, Outcome.REPLY_REFUSED_TOO_LONG if too_long else Outcome.REPLY_REFUSED))
            elif published is Published.UNROUTABLE or published is Published.FATAL_ADDRESS:
                unroutable = published is Published.UNROUTABLE
                log.warning(
                    "reply_unroutable" if unroutable else "reply_to_fatal",
                    request_id=_clip(job.request_id),
                    reply_to=job.message.reply_to,
                    action="dead-lettered",
                    why="the broker could not route the reply: its queue does not exist (NO_ROUTE)"
                    if unroutable
                    else "publishing to this direct reply-to address closed the broker connection: forged or stale",
                )
                settled.append((job, Outcome.REPLY_UNROUTABLE if unroutable else Outcome.REPLY_TO_FATAL))
            elif published is Published.LOST:
                settled.append((job, Outcome.REPLY_LOST))
            elif isinstance(published, Exception):
                log.warning("reply_lost", request_id=_clip(job.request_id), error=repr(published))
                settled.append((job, Outcome.REPLY_LOST))
            else:
                raise published
        await self._settle(settled)

    async def _settle(self, settled: Sequence[tuple[Job, Outcome]]) -> None:
        """Tell the broker what happened, per :func:`ack_action`; acks are batched per channel.

        Decisions and the frames that carry them are made under one lock, in order: the write queue
        under aiormq is bounded, so two settles racing for room could otherwise send a multiple-ack
        after a later one (an unknown delivery tag, which closes the channel) or before the requeue
        of a tag it covers (acking a request meant to go back).
        """
        async with self._settle_lock:
            self._last_settled_s = time.monotonic()
            frames: list[tuple[Any, AckAction, int, bool]] = []  # channel, action, tag, multiple
            to_ack: dict[int, tuple[AckLedger, Any, list[int]]] = {}
            for job, outcome in settled:
                message = job.message
                tag = message.delivery_tag
                assert tag is not None
                channel = _open_channel(message)
                action = ack_action(outcome)
                if action is AckAction.HOLD and channel is not None:
                    job.ledger.hold(tag)
                    self.metrics.requests.labels("reply_held").inc()
                    self._spawn(self._retry_reply(job))
                    continue
                self.metrics.inflight.dec()
                if job.suspect:
                    self._suspects_open -= 1
                if channel is None:
                    # The broker already requeued everything unacked on that channel.
                    log.debug("settle_dropped_closed_channel", request_id=job.request_id, outcome=outcome.value)
                    continue
                job.ledger.release(tag)
                entry = to_ack.setdefault(id(job.ledger), (job.ledger, channel, []))
                if action is AckAction.ACK:
                    entry[2].append(tag)
                    continue
                job.ledger.discard(tag)
                self.metrics.requests.labels("requeued" if action is AckAction.REQUEUE else "dead_lettered").inc()
                frames.append((channel, action, tag, False))
            for ledger, channel, tags in to_ack.values():
                # Also after a requeue or reject alone: removing a tag can free the acks queued behind it.
                last = ledger.settle(tags)
                if last is not None:
                    frames.append((channel, AckAction.ACK, last, True))
                # Settled behind a held reply: a multiple-ack would cover the held one.
                frames += [(channel, AckAction.ACK, tag, False) for tag in ledger.take_singles()]
            for channel, action, tag, multiple in frames:
                try:
                    if action is AckAction.ACK:
                        await channel.basic_ack(tag, multiple=multiple, wait=False)
                    elif action is AckAction.REQUEUE:
                        await channel.basic_nack(tag, multiple=False, requeue=True, wait=False)
                    else:
                        await channel.basic_reject(tag, requeue=False, wait=False)
                except (aiormq.exceptions.ChannelInvalidStateError, aiormq.exceptions.AMQPError, ConnectionError) as e:
                    log.debug("settle_failed", action=action.value, tag=tag, error=repr(e))

    async def _retry_reply(self, job: Job) -> None:
        """Publish a refused reply again after a backoff; its request stays unacked meanwhile.

        Draining (``stop_event``) cuts the wait short for one last try before the hand-back.
        """
        assert job.reply is not None
        delay_s = reply_retry_delay_s(job.reply_attempts)
        job.reply_attempts += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), delay_s)
        if _open_channel(job.message) is None:  # the broker has requeued the request already
            await self._settle([(job, Outcome.REPLY_LOST)])
            return
        await self._reply([job.reply])

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task_failed", error=repr(task.exception()), exc_info=task.exception())
        if not self._pending:
            self._wakeup.set()
