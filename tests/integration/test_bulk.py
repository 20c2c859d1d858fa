"""Bulk jobs end to end: real broker, real ``worker run`` processes, producers killed and rerun, forged replies."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.exceptions
import numpy as np
import pytest

from producer.bulk.job import BulkJob, BulkOptions, BulkSummary, JobFailedError, JobLockedError, default_job_id
from producer.bulk.jsonl import Row
from producer.bulk.signed_ids import RequestSigner
from producer.bulk.state import load_or_create_secret, state_path
from producer.wire.names import (
    CONTENT_TYPE_JSON,
    dead_letter_queue,
    results_queue,
    results_queue_arguments,
)
from producer.wire.protocol import ErrorCode, encode_error, encode_reply
from tests.support.logs import library_events
from tests.support.models import affine_model
from tests.support.worker_process import REPO_ROOT, WorkerProcess, child_env

pytestmark = pytest.mark.integration

ROWS = 2000

# A producer that freezes (its event loop blocked) once it has written `after` rows, and says so
# on stdout: the test then kills it at a known point, with requests and replies in flight.
_FREEZING_PRODUCER = """
import asyncio, sys, threading
from pathlib import Path
from producer.bulk.job import BulkJob, BulkOptions

class Freeze:
    def __init__(self, after): self.after, self.rows = after, 0
    def start(self, total_rows): pass
    def advance(self, rows, failed):
        self.rows += rows
        if self.rows >= self.after:
            print("frozen", self.rows, flush=True)
            threading.Event().wait()

input_path, output_path, queue, job_id, url, after = sys.argv[1:]
options = BulkOptions(input_path=Path(input_path), output_path=Path(output_path), queue=queue, job_id=job_id,
                      amqp_url=url, rows_per_message=10, max_in_flight=8)
asyncio.run(BulkJob(options, Freeze(int(after))).run())
"""


def _write_input(path: Path, rows: int = ROWS, extra: list[str] | None = None) -> Path:
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"r{i}", "inputs": {"x": [i, i + 0.5, -i, 1.0]}}) + "\n")
        for line in extra or []:
            f.write(line + "\n")
    return path


def _expected_y(i: int) -> list[float]:
    return [2 * v + 1 for v in (i, i + 0.5, -i, 1.0)]


def _read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_every_row_exactly_once(path: Path, rows: int = ROWS) -> None:
    out = _read_output(path)
    ids = [row["id"] for row in out]
    assert len(ids) == len(set(ids)), "an id appears twice"
    assert set(ids) == {f"r{i}" for i in range(rows)}
    for row in out:
        i = int(row["id"][1:])
        assert row["outputs"]["y"] == pytest.approx(_expected_y(i)), row["id"]
        assert row["line"] == i + 1


async def _queue_exists(amqp_url: str, name: str) -> bool:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        return True


async def _declared_with(amqp_url: str, name: str, arguments: dict[str, Any]) -> bool:
    """True when queue ``name`` exists with exactly ``arguments`` (the broker compares them on declare)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
            channel = await connection.channel()
            await channel.declare_queue(name, durable=True, arguments=arguments)
        except (aio_pika.exceptions.ChannelNotFoundEntity, aio_pika.exceptions.ChannelPreconditionFailed):
            return False
        return True


async def _publish_replies(amqp_url: str, queue: str, replies: Sequence[tuple[str | None, bytes]]) -> None:
    """Publish ``(correlation id, body)`` pairs into ``queue`` as anyone allowed to publish could."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for correlation_id, body in replies:
            message = aio_pika.Message(body, content_type=CONTENT_TYPE_JSON, correlation_id=correlation_id)
            await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)


async def _declare_results_queue(amqp_url: str, job_id: str, arguments: dict[str, Any]) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(results_queue(job_id), durable=True, arguments=arguments)


def _reply_body(body_id: str, first_row: int, rows: int, *, value: float | None = None) -> bytes:
    """A reply for input rows ``first_row ..``: the affine model's true outputs, or all ``value``."""
    y = np.array([_expected_y(i) for i in range(first_row, first_row + rows)], dtype=np.float32)
    if value is not None:
        y[:] = value
    return encode_reply(body_id, {"y": y}, CONTENT_TYPE_JSON, model_name="affine")


async def _delete_queues(amqp_url: str, *names: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name, if_unused=False, if_empty=False)


class _Threshold:
    """A progress sink that sets an event once ``after`` rows are written."""

    def __init__(self, after: int) -> None:
        self.after, self.rows = after, 0
        self.reached = asyncio.Event()

    def start(self, total_rows: int) -> None:
        pass

    def advance(self, rows: int, failed: int) -> None:
        self.rows += rows
        if self.rows >= self.after:
            self.reached.set()


@pytest.fixture(scope="module")
def affine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return affine_model(tmp_path_factory.mktemp("models") / "affine.onnx")


@pytest.fixture
async def queue(amqp_url: str) -> AsyncIterator[str]:
    name = f"test.bulk.{uuid.uuid4().hex[:8]}"
    yield name
    await _delete_queues(amqp_url, name, dead_letter_queue(name))


@pytest.fixture
async def job_id(amqp_url: str) -> AsyncIterator[str]:
    """A unique job id; its results queue (kept by the job for late replies) is deleted afterwards."""
    name = f"job-{uuid.uuid4().hex[:8]}"
    yield name
    await _delete_queues(amqp_url, results_queue(name))


@pytest.fixture(scope="module")
def shared_queue(amqp_url: str, affine: Path) -> Iterator[str]:
    """A queue with one affine worker (max batch 16) for the tests that do not restart anything."""
    name = f"test.bulk.shared.{uuid.uuid4().hex[:8]}"
    try:
        with WorkerProcess(amqp_url, affine, name, "--max-batch", "16"):
            yield name
    finally:
        asyncio.run(_delete_queues(amqp_url, name, dead_letter_queue(name)))


def _options(tmp_path: Path, amqp_url: str, queue: str, job_id: str, **kwargs: Any) -> BulkOptions:
    return BulkOptions(
        input_path=tmp_path / "in.jsonl",
        output_path=tmp_path / "out.jsonl",
        queue=queue,
        job_id=job_id,
        amqp_url=amqp_url,
        **kwargs,
    )


async def test_2000_rows_come_back_exactly_once_with_correct_results(
    amqp_url: str, shared_queue: str, job_id: str, tmp_path: Path
) -> None:
    _write_input(tmp_path / "in.jsonl")
    summary = await BulkJob(_options(tmp_path, amqp_url, shared_queue, job_id, rows_per_message=16)).run()
    assert (summary.written, summary.failed, summary.messages, summary.forged) == (ROWS, 0, ROWS // 16, 0)
    _assert_every_row_exactly_once(tmp_path / "out.jsonl")
    # Kept for late replies; the broker deletes it after the TTL.
    assert await _declared_with(amqp_url, results_queue(job_id), results_queue_arguments())


async def test_requests_larger_than_the_worker_batch_are_split_until_they_fit(
    amqp_url: str, shared_queue: str, job_id: str, tmp_path: Path
) -> None:
    _write_input(tmp_path / "in.jsonl", rows=200)
    options = _options(tmp_path, amqp_url, shared_queue, job_id, rows_per_message=50)
    summary = await BulkJob(options).run()
    assert summary.splits > 0
    assert (summary.written, summary.failed) == (200, 0)
    _assert_every_row_exactly_once(tmp_path / "out.jsonl", rows=200)


async def test_input_order_option_writes_rows_in_input_order(
    amqp_url: str, shared_queue: str, job_id: str, tmp_path: Path
) -> None:
    _write_input(tmp_path / "in.jsonl", rows=300)
    options = _options(tmp_path, amqp_url, shared_queue, job_id, rows_per_message=7, order="input")
    await BulkJob(options).run()
    assert [row["line"] for row in _read_output(tmp_path / "out.jsonl")] == list(range(1, 301))


def test_bad_rows_are_reported_per_row_and_the_job_continues(amqp_url: str, shared_queue: str, tmp_path: Path) -> None:
    bad = [
        "{not json",
        json.dumps({"id": "short", "inputs": {"x": [1, 2, 3]}}),
        json.dumps({"text": "no id"}),
        json.dumps({"id": "r5", "inputs": {"x": [5, 5.5, -5, 1.0]}}),
    ]
    _write_input(tmp_path / "in.jsonl", rows=100, extra=bad)
    output = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "producer.cli", "bulk", str(tmp_path / "in.jsonl"), "--output", str(output)]
    command += ["--queue", shared_queue, "--rows-per-message", "8", "--no-progress"]
    try:
        done = subprocess.run(
            command, env=child_env(amqp_url), cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
        )
    finally:
        asyncio.run(_delete_queues(amqp_url, results_queue(default_job_id(output))))
    assert done.returncode == 1, done.stderr
    assert "4 rows failed" in done.stdout
    rows = _read_output(output)
    errors = {row["line"]: row["error"]["code"] for row in rows if "error" in row}
    assert errors == {101: "invalid_json", 102: "wrong_shape", 103: "invalid_row", 104: "duplicate_id"}
    good = [row for row in rows if "outputs" in row]
    assert sorted(int(row["id"][1:]) for row in good) == list(range(100))


async def test_producer_killed_part_way_then_rerun_gives_every_row_exactly_once(
    amqp_url: str, affine: Path, queue: str, job_id: str, tmp_path: Path
) -> None:
    _write_input(tmp_path / "in.jsonl")
    async with WorkerProcess(amqp_url, affine, queue):
        producer = await asyncio.create_subprocess_exec(
            *[sys.executable, "-c", _FREEZING_PRODUCER, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")],
            *[queue, job_id, amqp_url, "500"],
            env=child_env(amqp_url),
            cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert producer.stdout is not None
            while not (line := await producer.stdout.readline()).startswith(b"frozen"):
                assert line, "the producer exited before freezing"
        finally:
            producer.send_signal(signal.SIGKILL)
            await producer.wait()
        assert producer.returncode == -signal.SIGKILL
        assert await _queue_exists(amqp_url, results_queue(job_id))
        summary = await BulkJob(_options(tmp_path, amqp_url, queue, job_id, rows_per_message=10)).run()
    assert summary.skipped > 0
    assert summary.collected > 0, "replies that arrived while the producer was down were not used"
    assert summary.skipped + summary.written == ROWS
    assert summary.forged == 0, "a reply to the killed run's requests failed verification"
    _assert_every_row_exactly_once(tmp_path / "out.jsonl")


async def test_worker_restarted_part_way_still_gives_every_row_exactly_once(
    amqp_url: str, affine: Path, queue: str, job_id: str, tmp_path: Path
) -> None:
    _write_input(tmp_path / "in.jsonl")
    threshold = _Threshold(after=ROWS // 3)
    options = _options(tmp_path, amqp_url, queue, job_id, rows_per_message=10)
    first, second = WorkerProcess(amqp_url, affine, queue), WorkerProcess(amqp_url, affine, queue)
    try:
        await first.start().wait_ready_async()
        job = asyncio.create_task(BulkJob(options, threshold).run())
        reached = asyncio.create_task(threshold.reached.wait())
        await asyncio.wait({job, reached}, return_when=asyncio.FIRST_COMPLETED)
        assert not job.done(), "the job finished before the worker could be restarted"
        first.signal(signal.SIGKILL)  # unacked requests go back to the queue
        await first.wait_async()
        await second.start().wait_ready_async()
        summary: BulkSummary = await asyncio.wait_for(job, timeout=90)
    finally:
        await first.stop_async()
        await second.stop_async()
    assert (summary.written, summary.failed) == (ROWS, 0)
    _assert_every_row_exactly_once(tmp_path / "out.jsonl")


async def test_a_missing_request_queue_stops_the_job_and_keeps_its_results_queue(
    amqp_url: str, job_id: str, tmp_path: Path
) -> None:
    _write_input(tmp_path / "in.jsonl", rows=20)
    options = _options(tmp_path, amqp_url, f"test.bulk.missing.{uuid.uuid4().hex}", job_id)
    with pytest.raises(JobFailedError, match=f"no queue named .* rerun with --job-id {job_id}"):
        await BulkJob(options).run()
    assert await _queue_exists(amqp_url, results_queue(job_id))


async def test_forged_replies_in_the_results_queue_never_reach_the_output(
    amqp_url: str, shared_queue: str, job_id: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_input(tmp_path / "in.jsonl", rows=100)
    made_up = f"{job_id}.deadbeef.1.{'0' * 32}"  # shaped like the job's ids, without the secret
    untagged = f"{job_id}.deadbeef.2"  # the id format of versions without tags
    forged: list[tuple[str | None, bytes]] = [
        (made_up, _reply_body(f'{made_up}:[[1,"r0"],[2,"r1"]]', 0, 2, value=999.0)),
        (untagged, _reply_body(f'{untagged}:[[3,"r2"]]', 2, 1, value=999.0)),
        (None, _reply_body(f'{made_up}:[[4,"r3"]]', 3, 1, value=999.0)),
        (made_up, b"\x00 not a reply"),
        (made_up, encode_error(f'{made_up}:[[5,"r4"]]', ErrorCode.INTERNAL, "forged", CONTENT_TYPE_JSON)),
    ]
    await _declare_results_queue(amqp_url, job_id, results_queue_arguments())
    await _publish_replies(amqp_url, results_queue(job_id), forged)
    with caplog.at_level(logging.WARNING, logger="qinfer.bulk"):
        summary = await BulkJob(_options(tmp_path, amqp_url, shared_queue, job_id, rows_per_message=8)).run()
    assert summary.forged == len(forged)
    assert (summary.written, summary.failed, summary.collected) == (100, 0, 0)
    _assert_every_row_exactly_once(tmp_path / "out.jsonl", rows=100)  # every value is the worker's, never 999
    logs = library_events(caplog)
    rejected = [e for e in logs if e["event"] == "bulk_reply_rejected"]
    assert len(rejected) == len(forged)
    assert all(e["log_level"] == "warning" and e["reason"] for e in rejected)


async def test_signed_replies_from_an_earlier_run_are_written_once_even_when_delivered_twice(
    amqp_url: str, shared_queue: str, job_id: str, tmp_path: Path
) -> None:
    _write_input(tmp_path / "in.jsonl", rows=100)
    # What an earlier run of the job left behind: its secret, and late (and duplicated) replies to its requests.
    secret, created = load_or_create_secret(state_path(tmp_path / "out.jsonl"))
    assert created
    signer = RequestSigner(secret, job_id)
    rows = [Row(line=i + 1, id=f"r{i}", inputs={}) for i in range(6)]
    first, overlapping = signer.sign("earlier.1", rows[:4]), signer.sign("earlier.2", rows[2:])
    late = [
        (first.correlation_id, _reply_body(first.body_id, 0, 4)),
        (first.correlation_id, _reply_body(first.body_id, 0, 4)),
        (overlapping.correlation_id, _reply_body(overlapping.body_id, 2, 4)),
    ]
    await _declare_results_queue(amqp_url, job_id, results_queue_arguments())
    await _publish_replies(amqp_url, results_queue(job_id), late)
    summary = await BulkJob(_options(tmp_path, amqp_url, shared_queue, job_id, rows_per_message=8)).run()
    assert (summary.collected, summary.forged, summary.written) == (6, 0, 100)
    _assert_every_row_exactly_once(tmp_path / "out.jsonl", rows=100)


async def test_a_second_run_of_a_running_job_refuses_and_a_rerun_after_a_kill_is_exactly_once(
    amqp_url: str, affine: Path, queue: str, job_id: str, tmp_path: Path
) -> None:
    rows = 600
    _write_input(tmp_path / "in.jsonl", rows=rows)
    output = tmp_path / "out.jsonl"
    async with WorkerProcess(amqp_url, affine, queue):
        producer = await asyncio.create_subprocess_exec(
            *[sys.executable, "-c", _FREEZING_PRODUCER, str(tmp_path / "in.jsonl"), str(output)],
            *[queue, job_id, amqp_url, "100"],
            env=child_env(amqp_url),
            cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert producer.stdout is not None
            while not (line := await producer.stdout.readline()).startswith(b"frozen"):
                assert line, "the producer exited before freezing"
            written_by_first = output.read_bytes()
            # The same command again: the output file's lock refuses it before it reads anything.
            with pytest.raises(JobLockedError, match=r"another producer bulk process is writing .* run this command"):
                await BulkJob(_options(tmp_path, amqp_url, queue, job_id, rows_per_message=10)).run()
            # The same job id from elsewhere (another output): the broker's lock refuses it.
            elsewhere = _options(tmp_path, amqp_url, queue, job_id, rows_per_message=10)
            elsewhere = BulkOptions(**{**vars(elsewhere), "output_path": tmp_path / "elsewhere.jsonl"})
            with pytest.raises(JobLockedError, match=f"job {job_id} is already running.*Wait for that run"):
                await BulkJob(elsewhere).run()
            assert output.read_bytes() == written_by_first
            assert (tmp_path / "elsewhere.jsonl").read_bytes() == b""
        finally:
            producer.send_signal(signal.SIGKILL)
            await producer.wait()
        # SIGKILL frees both locks: the rerun resumes and completes.
        summary = await BulkJob(_options(tmp_path, amqp_url, queue, job_id, rows_per_message=10)).run()
    assert summary.skipped > 0
    assert summary.skipped + summary.written == rows
    assert summary.forged == 0
    _assert_every_row_exactly_once(output, rows=rows)


async def test_a_results_queue_declared_by_an_older_version_is_used_as_it_is(
    amqp_url: str, shared_queue: str, job_id: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_input(tmp_path / "in.jsonl", rows=100)
    older = {"x-queue-type": "quorum"}  # no x-expires
    await _declare_results_queue(amqp_url, job_id, older)
    with caplog.at_level(logging.WARNING, logger="qinfer.bulk"):
        summary = await BulkJob(_options(tmp_path, amqp_url, shared_queue, job_id, rows_per_message=8)).run()
    assert (summary.written, summary.failed) == (100, 0)
    _assert_every_row_exactly_once(tmp_path / "out.jsonl", rows=100)
    [warning] = [e for e in library_events(caplog) if e["event"] == "bulk_results_queue_differs"]
    assert "x-expires" in warning["broker_says"]
    assert "delete_queue" in warning["fix"]
    assert await _declared_with(amqp_url, results_queue(job_id), older)
