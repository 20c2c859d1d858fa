"""Bulk jobs end to end: real broker, real ``worker run`` processes, producers killed and rerun."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.exceptions
import pytest

from producer.bulk import BulkJob, BulkOptions, BulkSummary, JobFailedError
from producer.names import dead_letter_queue, results_queue
from tests.models import affine_model
from tests.worker_process import REPO_ROOT, WorkerProcess, child_env

pytestmark = pytest.mark.integration

ROWS = 2000
WIDTH = 4

# A producer that freezes (its event loop blocked) once it has written `after` rows, and says so
# on stdout: the test then kills it at a known point, with requests and replies in flight.
_FREEZING_PRODUCER = """
import asyncio, sys, threading
from pathlib import Path
from producer.bulk import BulkJob, BulkOptions

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
    amqp_url: str, shared_queue: str, tmp_path: Path
) -> None:
    _write_input(tmp_path / "in.jsonl")
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    summary = await BulkJob(_options(tmp_path, amqp_url, shared_queue, job_id, rows_per_message=16)).run()
    assert (summary.written, summary.failed, summary.messages) == (ROWS, 0, ROWS // 16)
    _assert_every_row_exactly_once(tmp_path / "out.jsonl")
    assert not await _queue_exists(amqp_url, results_queue(job_id))


async def test_requests_larger_than_the_worker_batch_are_split_until_they_fit(
    amqp_url: str, shared_queue: str, tmp_path: Path
) -> None:
    _write_input(tmp_path / "in.jsonl", rows=200)
    options = _options(tmp_path, amqp_url, shared_queue, f"job-{uuid.uuid4().hex[:8]}", rows_per_message=50)
    summary = await BulkJob(options).run()
    assert summary.splits > 0
    assert (summary.written, summary.failed) == (200, 0)
    _assert_every_row_exactly_once(tmp_path / "out.jsonl", rows=200)


async def test_input_order_option_writes_rows_in_input_order(amqp_url: str, shared_queue: str, tmp_path: Path) -> None:
    _write_input(tmp_path / "in.jsonl", rows=300)
    options = _options(
        tmp_path, amqp_url, shared_queue, f"job-{uuid.uuid4().hex[:8]}", rows_per_message=7, order="input"
    )
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
    done = subprocess.run(command, env=child_env(amqp_url), cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "4 rows failed" in done.stdout
    rows = _read_output(output)
    errors = {row["line"]: row["error"]["code"] for row in rows if "error" in row}
    assert errors == {101: "invalid_json", 102: "wrong_shape", 103: "invalid_row", 104: "duplicate_id"}
    good = [row for row in rows if "outputs" in row]
    assert sorted(int(row["id"][1:]) for row in good) == list(range(100))


async def test_producer_killed_part_way_then_rerun_gives_every_row_exactly_once(
    amqp_url: str, affine: Path, queue: str, tmp_path: Path
) -> None:
    _write_input(tmp_path / "in.jsonl")
    job_id = f"job-{uuid.uuid4().hex[:8]}"
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
    _assert_every_row_exactly_once(tmp_path / "out.jsonl")
    assert not await _queue_exists(amqp_url, results_queue(job_id))


async def test_worker_restarted_part_way_still_gives_every_row_exactly_once(
    amqp_url: str, affine: Path, queue: str, tmp_path: Path
) -> None:
    _write_input(tmp_path / "in.jsonl")
    threshold = _Threshold(after=ROWS // 3)
    options = _options(tmp_path, amqp_url, queue, f"job-{uuid.uuid4().hex[:8]}", rows_per_message=10)
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


async def test_a_missing_request_queue_stops_the_job_and_keeps_its_results_queue(amqp_url: str, tmp_path: Path) -> None:
    _write_input(tmp_path / "in.jsonl", rows=20)
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    options = _options(tmp_path, amqp_url, f"test.bulk.missing.{uuid.uuid4().hex}", job_id)
    try:
        with pytest.raises(JobFailedError, match=f"no queue named .* rerun with --job-id {job_id}"):
            await BulkJob(options).run()
        assert await _queue_exists(amqp_url, results_queue(job_id))
    finally:
        await _delete_queues(amqp_url, results_queue(job_id))
