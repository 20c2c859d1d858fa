"""Bulk jobs: stream a JSONL file through the workers into a JSONL file, resumable after a crash.

How a job survives restarts:

* Replies go to a durable quorum queue per job (:func:`producer.wire.names.results_queue`), declared
  before the first request, so replies that arrive while the producer is down wait there. The
  queue is never deleted by the job: the broker drops it once it has been unused for
  ``results_ttl_s`` (``x-expires``), so a late reply always finds it.
* The output file and a small state file beside it (the job's secret,
  :mod:`producer.bulk.signed_ids`) are the job's other state: a rerun with the same job id skips every
  row already in the output, first collects the replies waiting in the results queue, then
  sends the rest.
* Each request body's ``id`` names its rows (:func:`producer.bulk.jsonl.encode_body_id`), so a reply
  to a request sent before the restart still maps back to its rows. A row is written at most
  once (the output is checked by id) and a run ends only when every row is written, so each
  input row appears in the output exactly once.

Who may write: one run per output file (an advisory ``flock`` on the output, local) and one run
per job id (an exclusive queue on the broker, :func:`producer.wire.names.job_lock_queue`, freed by the
broker when its owner's connection dies, SIGKILL included). A second run refuses at once. What
is written: only replies whose ids carry the job's HMAC tag (:class:`producer.bulk.signed_ids.RequestSigner`);
any other message in the results queue is acked, logged, counted as ``forged`` and dropped.

Model versions: with ``model``, requests go to the model's route, and the whole job is pinned to one
version, so one output never mixes embeddings of two versions: ``version`` when given, else the
version that answered the job's first request (one request is in flight until then). The version is
recorded in the job's state file, so a rerun keeps it.

Flow control: at most ``max_in_flight`` packed requests are outstanding (published and not yet
written); the input is read one line at a time. Publishes use publisher confirms and
``mandatory`` (a missing request queue fails the job instead of losing requests).

A request that gets an error reply while carrying several rows is split in halves and sent
again, so one bad row is reported on its own and its neighbours still get results.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import re
import socket
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions
import structlog
from opentelemetry import trace

from producer.amqp.messages import request_message
from producer.amqp.tls import TlsOptions
from producer.amqp.tls import connect as tls_connect
from producer.amqp.tracing import start_publish, tracer
from producer.bulk.jsonl import (
    LINE_KEYED_CODES,
    BadRow,
    Packer,
    Row,
    RowErrorCode,
    batch_inputs,
    count_rows,
    error_line,
    iter_input,
    parse_row,
    read_output,
    result_lines,
)
from producer.bulk.signed_ids import (
    JobStateError,
    RequestSigner,
    UnverifiedReplyError,
    is_private,
    load_or_create_secret,
    pinned_version,
    record_pinned_version,
    state_path,
)
from producer.wire.errors import BrokerTlsError, ConnectionLostError, InferenceError, ProtocolError, PublishRefusedError
from producer.wire.names import (
    CONTENT_TYPE_MSGPACK,
    DEFAULT_AMQP_URL,
    DEFAULT_MAX_BATCH,
    DEFAULT_QUEUE,
    DEFAULT_RESULTS_TTL_S,
    check_route_name,
    job_lock_queue,
    model_exchange,
    results_queue,
    results_queue_arguments,
    version_queue,
)
from producer.wire.protocol import ErrorCode, ErrorReply, decode_reply, encode_request

__all__ = [
    "BulkJob",
    "BulkOptions",
    "BulkSummary",
    "JobFailedError",
    "JobLockedError",
    "ProgressSink",
    "default_job_id",
]

log = structlog.get_logger(__name__)

DEFAULT_ROWS_PER_MESSAGE = DEFAULT_MAX_BATCH  # measured: bench/bulk_rows_per_message.py; the default worker --max-batch
DEFAULT_MAX_IN_FLIGHT = 64
_ACK_BATCH = 256
_LOCK_GRACE_S = 1.0
"""How long a run retries the job lock: a run killed a moment ago holds it until the broker sees its socket close."""
_LOCK_RETRY_S = 0.1
_LOGGED_REJECTIONS = 100
"""Rejected replies logged one by one; past this they are only counted (a flood must not flood the log)."""
Order = Literal["arrival", "input"]

_JOB_ID = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class JobFailedError(InferenceError):
    """Raised when a bulk job cannot go on (broker gone, queue missing); rerun it to resume."""


class JobLockedError(JobFailedError):
    """Raised when another run of the same job, or another job writing the same output, is running."""


def default_job_id(output_path: Path) -> str:
    """A job id derived from the output file's absolute path, so a plain rerun resumes the job."""
    digest = hashlib.sha1(str(output_path.resolve()).encode()).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", output_path.stem)[:60] or "job"
    return f"{stem}-{digest}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BulkOptions:
    """What one bulk job does.

    Args:
        input_path: JSONL input (see :mod:`producer.bulk.jsonl` for the row format).
        output_path: JSONL output; appended to, and read first to resume.
        queue: request queue the workers consume (not used with ``model``).
        model: send to this model's route instead of ``queue``; the job is pinned to one version.
        version: the version of ``model`` to pin the job to (default: the first reply's version).
        job_id: names the results queue; the same id resumes the job (default: from ``output_path``).
        amqp_url: RabbitMQ URL.
        tls: for an ``amqps://`` URL: CA bundle, client certificate and key (default: the system's CAs).
        results_ttl_s: the results queue is deleted by the broker after this many seconds unused
            (``x-expires``; default 24 h). Keep it the same across the runs of a job.
        rows_per_message: rows packed into one request (at most the workers' ``--max-batch``).
        max_in_flight: packed requests outstanding at once (the flow-control window).
        order: ``arrival`` writes rows as replies arrive; ``input`` writes them in input order.
        content_type: request encoding (msgpack is the fast path).
        text_input: input name for rows with ``"text"``.
        default_datatype: datatype of numeric ``inputs`` values (OIP name).
        datatypes: per-input datatype overrides.
    """

    input_path: Path
    output_path: Path
    queue: str = DEFAULT_QUEUE
    model: str | None = None
    version: str | None = None
    job_id: str | None = None
    amqp_url: str = dataclasses.field(default=DEFAULT_AMQP_URL, repr=False)
    tls: TlsOptions | None = None
    results_ttl_s: float = DEFAULT_RESULTS_TTL_S
    rows_per_message: int = DEFAULT_ROWS_PER_MESSAGE
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    order: Order = "arrival"
    content_type: str = CONTENT_TYPE_MSGPACK
    text_input: str = "text"
    default_datatype: str = "FP32"
    datatypes: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rows_per_message < 1:
            raise ValueError(f"--rows-per-message must be at least 1, got {self.rows_per_message}")
        if self.max_in_flight < 1:
            raise ValueError(f"--max-in-flight must be at least 1, got {self.max_in_flight}")
        if self.results_ttl_s < 1:
            raise ValueError(f"--results-ttl-s must be at least 1, got {self.results_ttl_s}")
        if self.version is not None and self.model is None:
            raise ValueError(f"--version {self.version} pins a version of a model: pass --model too")
        for kind, name in (("--model", self.model), ("--version", self.version)):
            if name is not None:
                check_route_name(kind, name)
        if self.job_id is not None and not _JOB_ID.match(self.job_id):
            raise ValueError(f"--job-id {self.job_id!r}: use 1-200 letters, digits, '.', '_' or '-'")

    @property
    def resolved_job_id(self) -> str:
        """``job_id``, or the one derived from the output path."""
        return self.job_id or default_job_id(self.output_path)


@dataclasses.dataclass
class BulkSummary:
    """What a run did. Counts are rows unless named otherwise."""

    job_id: str
    input_rows: int = 0
    skipped: int = 0
    """Rows already in the output when the run started."""
    written: int = 0
    """Rows this run added to the output (results and errors)."""
    failed: int = 0
    """Rows this run reported as errors."""
    failed_before: int = 0
    """Error rows already in the output when the run started."""
    collected: int = 0
    """Rows answered by requests an earlier run sent (collected from the results queue)."""
    forged: int = 0
    """Replies (messages, not rows) dropped unwritten: nothing proved they answer a request of this job."""
    messages: int = 0
    """Requests published (splits included)."""
    splits: int = 0
    """Multi-row requests split in halves after an error reply."""
    model_version: str | None = None
    """The version the job is pinned to (with a model)."""
    other_version: int = 0
    """Replies (messages) from another version than the pinned one: its queue was drained onto the route."""
    errors_by_code: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    elapsed_s: float = 0.0

    @property
    def failed_total(self) -> int:
        """Error rows in the whole output file."""
        return self.failed + self.failed_before

    @property
    def rows_per_s(self) -> float:
        """Rows written per second of this run."""
        return self.written / self.elapsed_s if self.elapsed_s > 0 else 0.0


class ProgressSink(Protocol):
    """Receives progress; the CLI draws a progress bar from it."""

    def start(self, total_rows: int) -> None:
        """The run will write about ``total_rows`` rows."""

    def advance(self, rows: int, failed: int) -> None:
        """``rows`` more rows were written, ``failed`` of them errors."""


@dataclasses.dataclass(slots=True)
class _Unit:
    """One slot of the flow-control window: a packed request and its splits."""

    remaining: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Sent:
    """A request this run published and has no reply to yet."""

    rows: list[Row]
    body_id: str


@dataclasses.dataclass(slots=True)
class _Slot:
    """A row that is scanned and not yet written."""

    line: int
    id: str | None
    keyed: bool
    """Known by id in the output (False for rows the producer rejected)."""
    unit: _Unit | None = None
    text: bytes | None = None
    code: str | None = None


class BulkJob:
    """One run of a bulk job. ``await BulkJob(options).run()`` returns a :class:`BulkSummary`.

    Raises from :meth:`run`:
        JobFailedError: the job cannot go on; the results queue is kept, so a rerun resumes.
    """

    def __init__(self, options: BulkOptions, progress: ProgressSink | None = None) -> None:
        self.options = options
        self.job_id = options.resolved_job_id
        self.results_queue = results_queue(self.job_id)
        self.summary = BulkSummary(job_id=self.job_id)
        self._progress = progress
        self._nonce = uuid.uuid4().hex[:8]
        self._seq = 0
        self._done_ids: set[str] = set()
        self._done_lines: set[int] = set()
        self._seen: set[str] = set()
        self._pending: dict[str, _Slot] = {}
        self._order: collections.deque[_Slot] = collections.deque()
        self._early: dict[str, tuple[bytes, str | None]] = {}
        self._requests: dict[str, _Sent] = {}
        self._signer: RequestSigner | None = None
        self._packer = Packer(options.rows_per_message)
        self._unwritten = 0
        self._scanning = True
        self._window = asyncio.Semaphore(options.max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        self._collected_waiting: asyncio.Future[None] | None = None
        self._finished: asyncio.Future[None] | None = None
        self._out: IO[bytes] | None = None
        self._publish_channel: aio_pika.abc.AbstractChannel | None = None
        self._version: str | None = options.version
        self._reply_seen: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------------------------------
    # The run

    async def run(self) -> BulkSummary:
        """Run (or resume) the job to completion; the results queue is kept (it expires on its own).

        Raises:
            JobLockedError: another run of this job, or another job writing this output, is running.
            JobFailedError: the job cannot go on; rerun to resume.
        """
        opts = self.options
        started_s = time.monotonic()
        self._finished = asyncio.get_running_loop().create_future()
        with self._locked_output() as self._out:
            self._signer = RequestSigner(self._job_secret(), self.job_id)
            self._pin_recorded_version()
            state = read_output(opts.output_path)
            self._done_ids, self._done_lines = state.done_ids, state.done_lines
            self.summary.failed_before = state.failed
            self.summary.skipped = state.rows
            if self._progress is not None:
                self._progress.start(max(0, count_rows(opts.input_path) - state.rows))
            log.info("bulk_start", job_id=self.job_id, queue=opts.queue, already_done=state.rows)
            publisher = await self._connect("publish")
            try:
                consumer = await self._connect("collect")
            except JobFailedError:
                await publisher.close()
                raise
            try:
                for connection in (publisher, consumer):
                    connection.close_callbacks.add(self._on_connection_closed)
                await self._run(publisher, consumer)
                self._out.flush()
            finally:
                finished = self._finished_future()
                if not finished.done():
                    finished.cancel()  # closing the connections below must not record a failure
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
                for connection in (publisher, consumer):
                    connection.close_callbacks.discard(self._on_connection_closed)
                    await connection.close()
        self.summary.elapsed_s = time.monotonic() - started_s
        log.info(
            "bulk_done",
            job_id=self.job_id,
            written=self.summary.written,
            failed=self.summary.failed,
            forged=self.summary.forged,
        )
        return self.summary

    @contextlib.contextmanager
    def _locked_output(self) -> collections.abc.Iterator[IO[bytes]]:
        """The output file, open for appending, under an exclusive advisory lock held until the run ends.

        The lock keeps a second run on this machine (same job, or another job id pointed at the
        same file) from writing or truncating the file while this one writes it.
        """
        path = self.options.output_path
        try:
            out = path.open("ab")
        except OSError as e:
            raise JobFailedError(f"cannot open the output file {path}: {e.strerror}") from e
        with out:
            try:
                fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise JobLockedError(
                    f"job {self.job_id} not started: another producer bulk process is writing {path} (it holds the "
                    "file's lock). Wait for it to finish, or stop it, then run this command again to resume."
                ) from e
            yield out

    def _job_secret(self) -> bytes:
        """The job's secret from the state file beside the output, created on the first run."""
        path = state_path(self.options.output_path)
        try:
            secret, created = load_or_create_secret(path)
        except JobStateError as e:
            raise JobFailedError(str(e)) from e
        if created:
            log.info("bulk_state_created", job_id=self.job_id, path=str(path))
        elif not is_private(path):
            log.warning(
                "bulk_state_readable_by_others",
                job_id=self.job_id,
                path=str(path),
                why="whoever can read the job's secret can forge replies the job accepts",
                fix=f"chmod 600 {path}",
            )
        return secret

    def _pin_recorded_version(self) -> None:
        """Pin the job to the version an earlier run recorded; a different --version is refused."""
        if self.options.model is None:
            return
        recorded = pinned_version(state_path(self.options.output_path))
        if recorded is None:
            if self._version is not None:
                self._record_version(self._version)
            return
        if self._version is not None and self._version != recorded:
            raise JobFailedError(
                f"job {self.job_id} is pinned to version {recorded} of model {self.options.model} (its output holds "
                f"that version's results): rerun with --version {recorded}, or write a new output for version "
                f"{self._version}"
            )
        self._version = recorded
        self.summary.model_version = recorded

    def _record_version(self, version: str) -> None:
        self._version = self.summary.model_version = version
        try:
            record_pinned_version(state_path(self.options.output_path), version)
        except JobStateError as e:
            raise JobFailedError(str(e)) from e
        log.info("bulk_version_pinned", job_id=self.job_id, model=self.options.model, version=version)

    def _target(self) -> tuple[str, str]:
        """Exchange and routing key of the job's requests: its queue, its pinned version, or its model's route."""
        opts = self.options
        if opts.model is None:
            return "", opts.queue
        if self._version is not None:
            return "", version_queue(opts.model, self._version)
        return model_exchange(opts.model), ""

    async def _wait_for_version(self) -> None:
        """Until the job's version is known, one request at a time: the version its reply names pins the job."""
        while self.options.model is not None and self._version is None and self._requests:
            self._reply_seen = asyncio.get_running_loop().create_future()
            await self._wait(self._reply_seen)

    async def _connect(self, role: str) -> aio_pika.abc.AbstractConnection:
        """A connection named for the management UI: which job, which process, what for."""
        name = f"producer bulk {self.job_id} {role} (pid {os.getpid()} on {socket.gethostname()})"
        try:
            return await tls_connect(
                self.options.amqp_url, self.options.tls, client_properties={"connection_name": name}
            )
        except BrokerTlsError as e:
            raise JobFailedError(str(e)) from e
        except (*aio_pika.exceptions.CONNECTION_EXCEPTIONS, TimeoutError) as e:
            raise JobFailedError(f"cannot connect to the broker: {e}") from e

    async def _lock_job(self, connection: aio_pika.abc.AbstractConnection) -> None:
        """Declare the job's lock queue, exclusive to ``connection``: one run per job id at a time.

        The broker refuses the declaration (RESOURCE_LOCKED) while another connection owns the
        queue, and deletes the queue when its owner's connection closes or dies.
        """
        name = job_lock_queue(self.job_id)
        give_up_s = time.monotonic() + _LOCK_GRACE_S
        while True:
            channel = await connection.channel()
            try:
                await channel.declare_queue(name, exclusive=True, auto_delete=True)
            except aiormq.exceptions.ChannelLockedResource as e:
                if time.monotonic() >= give_up_s:
                    raise JobLockedError(
                        f"job {self.job_id} is already running: another producer bulk holds its lock on the broker "
                        f"(queue {name}; its connections are named 'producer bulk {self.job_id} ...'). Only one run of "
                        "a job may collect its results. Wait for that run to finish, or stop it, then run this "
                        "command again to resume (the broker frees the lock as soon as it sees the other run's "
                        "connection gone: at once for a killed process, within the heartbeat timeout for a lost host)."
                    ) from e
                await asyncio.sleep(_LOCK_RETRY_S)
                continue
            await channel.close()
            return

    async def _declare_results_queue(
        self, connection: aio_pika.abc.AbstractConnection
    ) -> tuple[aio_pika.abc.AbstractChannel, aio_pika.abc.AbstractQueue]:
        """Declare the results queue with this version's arguments, or use an existing one as it is.

        A queue declared earlier with other arguments (an older version without ``x-expires``,
        or another ``--results-ttl-s``) makes the broker refuse the declaration
        (PRECONDITION_FAILED, which closes the channel): the job then uses the queue as it is.
        """
        channel = await connection.channel()
        arguments = results_queue_arguments(self.options.results_ttl_s)
        try:
            return channel, await channel.declare_queue(self.results_queue, durable=True, arguments=arguments)
        except aio_pika.exceptions.ChannelPreconditionFailed as e:
            log.warning(
                "bulk_results_queue_differs",
                job_id=self.job_id,
                queue=self.results_queue,
                broker_says=str(e.args[0] if e.args else e),
                action="using the queue with the arguments it has",
                why="declared by an older version (no x-expires) or with another --results-ttl-s",
                fix=f"once no run of job {self.job_id} is pending, delete the queue (rabbitmqctl delete_queue "
                f"{self.results_queue}); the next run declares it with x-expires",
            )
        channel = await connection.channel()
        return channel, await channel.declare_queue(self.results_queue, passive=True)

    async def _run(self, publisher: aio_pika.abc.AbstractConnection, consumer: aio_pika.abc.AbstractConnection) -> None:
        opts = self.options
        await self._lock_job(consumer)
        self._publish_channel = await publisher.channel(publisher_confirms=True, on_return_raises=True)
        channel, queue = await self._declare_results_queue(consumer)
        await channel.set_qos(prefetch_count=min(65535, 2 * opts.max_in_flight + 16))
        waiting = queue.declaration_result.message_count or 0
        for ch in (self._publish_channel, channel):
            ch.close_callbacks.add(self._on_connection_closed)
        self._collected_waiting = asyncio.get_running_loop().create_future()
        consumer_tag = await queue.consume(self._on_message)
        self._own(self._handle_replies(waiting_at_start=waiting))
        if waiting:
            log.info("bulk_collecting", job_id=self.job_id, waiting=waiting)
            assert self._collected_waiting is not None
            await self._wait(self._collected_waiting)
        await self._scan()
        self._scanning = False
        self._early.clear()
        self._check_finished()
        await self._wait(self._finished_future())
        await queue.cancel(consumer_tag)

    def _finished_future(self) -> asyncio.Future[None]:
        assert self._finished is not None
        return self._finished

    async def _wait(self, future: asyncio.Future[Any]) -> None:
        """Wait for ``future``, or raise the job's failure if that comes first."""
        finished = self._finished_future()
        if future is not finished:
            await asyncio.wait([future, finished], return_when=asyncio.FIRST_COMPLETED)
            if finished.done():
                finished.result()
        await future

    def _fail(self, error: BaseException) -> None:
        finished = self._finished_future()
        if not finished.done():
            if not isinstance(error, JobFailedError):
                error = JobFailedError(f"{error}; rerun with --job-id {self.job_id} to resume")
            finished.set_exception(error)

    def _on_connection_closed(self, _sender: object, exc: BaseException | None) -> None:
        self._fail(ConnectionLostError(f"the broker connection closed ({exc or 'closed'})"))

    def _own(self, coro: collections.abc.Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------------
    # Sending

    async def _scan(self) -> None:
        opts = self.options
        packer = self._packer
        for line, text in iter_input(opts.input_path):
            self.summary.input_rows += 1
            parsed = parse_row(
                line,
                text,
                text_input=opts.text_input,
                default_datatype=opts.default_datatype,
                datatypes=opts.datatypes,
            )
            slot = self._admit(parsed)
            if slot is None:
                continue
            if isinstance(parsed, BadRow):
                self._add_resolved(slot, error_line(line, parsed.id, parsed.code, parsed.message), parsed.code)
            elif slot.text is not None:
                self._add_resolved(slot, slot.text, slot.code)
            else:
                self._add_pending(slot)
                for group in packer.add(parsed):
                    await self._send(group)
            if self._finished_future().done():
                self._finished_future().result()
        last = packer.flush()
        if last:
            await self._send(last)

    def _admit(self, parsed: Row | BadRow) -> _Slot | None:
        """The slot of a scanned row, or None when the output already has it."""
        keyed = parsed.id is not None and not (isinstance(parsed, BadRow) and parsed.code in LINE_KEYED_CODES)
        if parsed.line in self._done_lines:
            return None
        if not keyed:
            return _Slot(parsed.line, parsed.id, keyed=False)
        assert parsed.id is not None
        if parsed.id in self._seen:
            slot = _Slot(parsed.line, parsed.id, keyed=False)
            message = f"id {parsed.id!r} appeared on an earlier line; only the first is sent"
            slot.text = error_line(parsed.line, parsed.id, RowErrorCode.DUPLICATE_ID, message)
            slot.code = RowErrorCode.DUPLICATE_ID
            return slot
        self._seen.add(parsed.id)
        if parsed.id in self._done_ids:
            return None
        slot = _Slot(parsed.line, parsed.id, keyed=True)
        early = self._early.pop(parsed.id, None)
        if early is not None:
            slot.text, slot.code = early
        return slot

    def _add_resolved(self, slot: _Slot, text: bytes, code: str | None) -> None:
        slot.text, slot.code = text, code
        self._unwritten += 1
        if self.options.order == "input":
            self._order.append(slot)
            self._write_ready()
        else:
            self._write(slot)

    def _add_pending(self, slot: _Slot) -> None:
        assert slot.id is not None
        self._unwritten += 1
        self._pending[slot.id] = slot
        if self.options.order == "input":
            self._order.append(slot)

    async def _send(self, group: list[Row]) -> None:
        await self._wait_for_version()
        await self._wait_for_window()
        # Rows answered meanwhile by an earlier run's request need no request.
        rows = [r for r in group if (s := self._pending.get(r.id)) is not None and s.text is None]
        if not rows:
            self._window.release()
            return
        unit = _Unit(remaining=len(rows))
        for row in rows:
            self._pending[row.id].unit = unit
        self._publish(rows)
        await asyncio.sleep(0)  # let replies and confirms in between publishes

    async def _wait_for_window(self) -> None:
        if not self._window.locked():
            await self._window.acquire()  # free: returns at once
            return
        acquire = asyncio.ensure_future(self._window.acquire())
        try:
            await self._wait(acquire)
        finally:
            if not acquire.done():
                acquire.cancel()

    def _publish(self, rows: list[Row]) -> None:
        opts = self.options
        assert self._signer is not None
        self._seq += 1
        ids = self._signer.sign(f"{self._nonce}.{self._seq}", rows)
        body = encode_request(batch_inputs(rows), opts.content_type, request_id=ids.body_id)
        message = request_message(
            body,
            request_id=ids.correlation_id,
            content_type=opts.content_type,
            reply_to=self.results_queue,
            persistent=True,
        )
        self._requests[ids.correlation_id] = _Sent(rows, ids.body_id)
        self.summary.messages += 1
        self._own(self._publish_one(message))

    async def _publish_one(self, message: aio_pika.Message) -> None:
        assert self._publish_channel is not None
        exchange_name, queue = self._target()
        where = f"route {exchange_name!r}" if exchange_name else f"queue {queue!r}"
        exchange = (
            await self._publish_channel.get_exchange(exchange_name, ensure=False)  # no round trip
            if exchange_name
            else self._publish_channel.default_exchange
        )
        span = start_publish(tracer(), message, queue)  # ends at the broker's confirm: replies come later
        try:
            with trace.use_span(span, end_on_exit=True):
                await exchange.publish(message, routing_key=queue, mandatory=True)
        except aio_pika.exceptions.PublishError as e:
            if exchange_name:
                raise PublishRefusedError(
                    f"no version of model {self.options.model!r} takes unpinned requests (every weight is 0): "
                    "pass --version, or give a version a weight, and rerun"
                ) from e
            raise PublishRefusedError(
                f"no queue named {queue!r}: start a worker for it (it declares the queue) and rerun"
            ) from e
        except aio_pika.exceptions.DeliveryError as e:
            raise PublishRefusedError(f"the broker refused a request to {where} (nack)") from e

    # ------------------------------------------------------------------------------------------
    # Receiving

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self._inbox.put_nowait(message)

    async def _handle_replies(self, waiting_at_start: int) -> None:
        """Handle replies in arrival order: write their rows, flush the file, then ack.

        Replies that arrived together are written with one flush and acked with one
        ``multiple`` ack (this consumer is alone on its channel, so earlier tags are all handled).
        """
        handled = 0
        while True:
            batch = [await self._inbox.get()]
            while not self._inbox.empty() and len(batch) < _ACK_BATCH:
                batch.append(self._inbox.get_nowait())
            for message in batch:
                self._handle_reply(message)
            if self._reply_seen is not None and not self._reply_seen.done():
                self._reply_seen.set_result(None)
            assert self._out is not None
            self._out.flush()
            await batch[-1].ack(multiple=True)
            before, handled = handled, handled + len(batch)
            if before < waiting_at_start <= handled and self._collected_waiting is not None:
                self._collected_waiting.set_result(None)

    def _handle_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        """Write the rows a reply answers, once its ids prove this job sent the request.

        A reply to a request this run sent is recognised by its correlation id (which carries
        the request's tag) and must echo the body id the request carried. Any other reply must
        verify under the job's secret (:meth:`RequestSigner.verify`): it answers a request of an
        earlier run, or answers one of this run's requests a second time. Everything else is
        dropped (:meth:`_reject`); the caller acks it either way.
        """
        assert self._signer is not None
        correlation_id = message.correlation_id or ""
        sent = self._requests.get(correlation_id) if correlation_id else None
        try:
            reply = decode_reply(message.body, message.content_type)
        except ProtocolError as e:
            if sent is None:
                self._reject(correlation_id, f"the body cannot be decoded ({e})")
                return
            del self._requests[correlation_id]
            log.warning("bulk_bad_reply", job_id=self.job_id, request_id=correlation_id, error=str(e))
            self._on_error(sent.rows, e.code, f"the worker's reply could not be decoded: {e.message}")
            return
        rows: list[tuple[int, str]]
        if sent is not None:
            # A worker that could not decode the request answers with the correlation id as the body id.
            if reply.id != sent.body_id and not (isinstance(reply, ErrorReply) and reply.id == correlation_id):
                self._reject(correlation_id, "the body id is not the one the request carried")
                return
            del self._requests[correlation_id]
            if isinstance(reply, ErrorReply):
                self._on_error(sent.rows, reply.code, reply.message)
                return
            rows = [(r.line, r.id) for r in sent.rows]
        else:
            try:
                rows = self._signer.verify(correlation_id, reply.id)
            except UnverifiedReplyError as e:
                self._reject(correlation_id, str(e))
                return
            if isinstance(reply, ErrorReply):
                # An earlier run's request failed (or this run's was answered twice): its rows are sent again.
                return
        self._check_version(reply.model_version)
        try:
            lines = result_lines(rows, reply)
        except ValueError as e:
            if sent is not None:
                self._on_error(sent.rows, ErrorCode.INTERNAL, f"the worker's reply does not match the request: {e}")
            return
        for (_, row_id), text in zip(rows, lines, strict=True):
            self._resolve(row_id, text, None, earlier_run=sent is None)

    def _check_version(self, version: str | None) -> None:
        """Pin the job to the first version that answers; count (and warn about) replies from another one."""
        if self.options.model is None or version is None:
            return
        if self._version is None:
            self._record_version(version)
        elif version != self._version:
            self.summary.other_version += 1
            if self.summary.other_version == 1:
                log.warning(
                    "bulk_other_version",
                    job_id=self.job_id,
                    pinned=self._version,
                    answered=version,
                    why="the pinned version's queue was drained onto the route (its release was removed)",
                    action="written; the summary counts these rows",
                )

    def _reject(self, correlation_id: str, reason: str) -> None:
        """Drop a reply nothing proves this job asked for: count it, log it, never write it."""
        self.summary.forged += 1
        if self.summary.forged > _LOGGED_REJECTIONS:
            return
        log.warning(
            "bulk_reply_rejected",
            job_id=self.job_id,
            correlation_id=correlation_id[:120],
            reason=reason,
            action="acked and dropped",
            why="it answers no request of this job: forged, or sent to this queue by mistake",
        )
        if self.summary.forged == _LOGGED_REJECTIONS:
            log.warning(
                "bulk_reply_rejected_quiet",
                job_id=self.job_id,
                note="further rejected replies are counted in the summary, not logged",
            )

    def _on_error(self, rows: list[Row], code: str, message: str) -> None:
        unresolved = [r for r in rows if (s := self._pending.get(r.id)) is not None and s.text is None]
        if len(unresolved) > 1:
            self.summary.splits += 1
            half = len(unresolved) // 2
            if code == ErrorCode.TOO_MANY_ROWS and half < self._packer.rows_per_message:
                # The workers take fewer rows per request than asked: pack fewer from now on.
                log.warning("bulk_rows_per_message_lowered", job_id=self.job_id, rows_per_message=half)
                self._packer.rows_per_message = half
            self._publish(unresolved[:half])
            self._publish(unresolved[half:])
            return
        for row in unresolved:
            self._resolve(row.id, error_line(row.line, row.id, code, message), code, earlier_run=False)

    def _resolve(self, row_id: str, text: bytes, code: str | None, *, earlier_run: bool) -> None:
        """A row has its result (or error); write it unless the output already has it."""
        if row_id in self._done_ids:
            return
        slot = self._pending.get(row_id)
        if slot is None:
            if not earlier_run:
                return
            if self.options.order == "arrival":
                # Not scanned yet: write now; the scan will find the id done and skip it.
                slot = _Slot(0, row_id, keyed=True, text=text, code=code)
                self._unwritten += 1
                self.summary.collected += 1
                self._write(slot)
            elif self._scanning:
                self._early[row_id] = (text, code)
            return
        if slot.text is not None:
            return
        slot.text, slot.code = text, code
        if earlier_run:
            self.summary.collected += 1
        if self.options.order == "input":
            self._write_ready()
        else:
            self._write(slot)

    # ------------------------------------------------------------------------------------------
    # Writing

    def _write_ready(self) -> None:
        while self._order and self._order[0].text is not None:
            self._write(self._order.popleft())

    def _write(self, slot: _Slot) -> None:
        assert self._out is not None
        assert slot.text is not None
        self._out.write(slot.text)
        self._unwritten -= 1
        if slot.keyed:
            assert slot.id is not None
            self._done_ids.add(slot.id)
            self._pending.pop(slot.id, None)
        self.summary.written += 1
        failed = slot.code is not None
        if failed:
            self.summary.failed += 1
            self.summary.errors_by_code[str(slot.code)] += 1
        if slot.unit is not None:
            slot.unit.remaining -= 1
            if slot.unit.remaining == 0:
                self._window.release()
        if self._progress is not None:
            self._progress.advance(1, int(failed))
        self._check_finished()

    def _check_finished(self) -> None:
        finished = self._finished_future()
        if not self._scanning and self._unwritten == 0 and not finished.done():
            finished.set_result(None)
