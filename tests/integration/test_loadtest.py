"""A short load test against a real worker produces a full report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer.cli import main as producer_main
from producer.loadtest.payloads import PayloadSpec, build_bodies
from producer.loadtest.profiles import Profile
from producer.loadtest.report import MARKDOWN_SECTIONS, ReportContext, write_report
from producer.loadtest.runner import LoadRunner, LoadTestError, Target
from producer.loadtest.stats import OK, summarize
from tests.support.models import mlp_model
from tests.support.worker_process import WorkerProcess
from tests.support.workers import running_worker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mlp_model(tmp_path_factory.mktemp("models") / "mlp.onnx", width=16, hidden=8)


async def test_a_short_burst_against_a_worker_yields_a_report_with_every_section(
    amqp_url: str, model: Path, queue: str, tmp_path: Path
) -> None:
    profile = Profile(
        mode="burst", rate_per_s=40, burst_rate_per_s=300, burst_start_s=0.5, burst_duration_s=0.5, duration_s=1.5
    )
    payload = PayloadSpec(kind="tensor", rows=2, dims=(16,))
    snapshots = []
    async with running_worker(amqp_url, model, queue):
        runner = LoadRunner(
            Target(amqp_url=amqp_url, queue=queue, depth_interval_s=0.05),
            profile,
            build_bodies(payload),
            content_type=payload.content_type,
            rows=payload.rows,
            on_progress=snapshots.append,
            progress_interval_s=0.1,
        )
        result = await runner.run()
    expected = profile.expected_requests()
    assert len(result.samples) == expected == 190  # 20 + 150 + 20
    assert all(s.outcome == OK for s in result.samples)
    assert all(s.timing.keys() >= {"broker_ms", "batch_wait_ms", "compute_ms", "batch_rows"} for s in result.samples)
    assert result.consumers == 1
    assert result.depth, "the queue depth was never read"
    assert snapshots[-1].ok == expected

    summary = summarize(result.samples, send_duration_s=result.send_duration_s, depth=result.depth, bin_s=0.25)
    assert summary.ok == expected
    assert summary.rows_ok == 2 * expected
    assert summary.batches is not None
    assert summary.batches.mean_rows >= 2
    assert [s.stage for s in summary.stages] == ["send_lag", "broker", "batch_wait", "compute", "return"]
    paths = write_report(
        tmp_path / "report",
        summary=summary,
        result=result,
        profile=profile,
        payload=payload,
        context=ReportContext(queue=queue, amqp_url="amqp://***@broker/", depth_source="passive queue declare"),
    )
    headings = [
        line.removeprefix("## ") for line in paths["markdown"].read_text().splitlines() if line.startswith("## ")
    ]
    assert headings == list(MARKDOWN_SECTIONS)
    assert paths["plot"].stat().st_size > 10_000
    assert json.loads(paths["json"].read_text())["summary"]["ok"] == expected


DEFAULT_MODEL = ROOT / "models" / "all-MiniLM-L6-v2"


@pytest.mark.skipif(not DEFAULT_MODEL.is_dir(), reason="no default model: build it with `make model`")
async def test_text_payloads_are_embedded_by_the_default_model(amqp_url: str, queue: str) -> None:
    payload = PayloadSpec(kind="text", rows=2, variants=8)
    profile = Profile(mode="constant", rate_per_s=20, duration_s=1)
    async with running_worker(amqp_url, DEFAULT_MODEL, queue):
        runner = LoadRunner(
            Target(amqp_url=amqp_url, queue=queue),
            profile,
            build_bodies(payload),
            content_type=payload.content_type,
            rows=payload.rows,
        )
        result = await runner.run()
    assert [s.outcome for s in result.samples] == [OK] * 20
    assert sum(int(s.timing["batch_rows"]) >= 2 for s in result.samples) == 20


async def test_closed_loop_keeps_the_concurrency_and_stops_at_max_requests(
    amqp_url: str, model: Path, queue: str
) -> None:
    profile = Profile(mode="closed", concurrency=4, duration_s=30, max_requests=60)
    payload = PayloadSpec(kind="tensor", dims=(16,))
    async with running_worker(amqp_url, model, queue):
        runner = LoadRunner(
            Target(amqp_url=amqp_url, queue=queue),
            profile,
            build_bodies(payload),
            content_type=payload.content_type,
            rows=1,
        )
        result = await runner.run()
    assert len(result.samples) == 60
    assert all(s.outcome == OK for s in result.samples)
    # Each user sends its next request only after its reply: never more than 4 in flight.
    events = sorted([(s.sent_s, 1) for s in result.samples] + [(s.replied_s or 0.0, -1) for s in result.samples])
    inflight = peak = 0
    for _, step in events:
        inflight += step
        peak = max(peak, inflight)
    assert peak <= 4


async def test_with_coalescing_concurrent_requests_share_messages_and_each_is_answered(
    amqp_url: str, model: Path, queue: str
) -> None:
    profile = Profile(mode="closed", concurrency=64, duration_s=30, max_requests=640)
    payload = PayloadSpec(kind="tensor", dims=(16,))
    async with running_worker(amqp_url, model, queue) as worker:
        runner = LoadRunner(
            Target(amqp_url=amqp_url, queue=queue),
            profile,
            build_bodies(payload),
            content_type=payload.content_type,
            rows=1,
            coalesce_rows=16,
        )
        result = await runner.run()
        rows_run = worker.rows_run
    assert len(result.samples) == 640
    assert all(s.outcome == OK for s in result.samples)
    assert rows_run == 640
    assert max(s.timing["batch_rows"] for s in result.samples) > 1
    sent_at = {s.sent_s for s in result.samples}
    assert len(sent_at) < 640, "every request went in a message of its own"


async def test_a_missing_queue_fails_with_a_clear_error(amqp_url: str, queue: str) -> None:
    runner = LoadRunner(
        Target(amqp_url=amqp_url, queue=queue),
        Profile(mode="constant", rate_per_s=1, duration_s=1),
        [b"{}"],
        content_type="application/json",
        rows=1,
    )
    with pytest.raises(LoadTestError, match="does not exist"):
        await runner.run()


def test_the_cli_runs_against_a_worker_process_and_prints_the_report_folder(
    amqp_url: str, model: Path, queue: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Not waited for: the CLI's --wait-consumers is part of what this test runs.
    worker = WorkerProcess(amqp_url, model, queue).start()
    try:
        status = producer_main(
            [
                "load-test",
                "--amqp-url",
                amqp_url,
                "--queue",
                queue,
                "--wait-consumers",
                "1",
                "--wait-timeout-s",
                "60",
                "--payload",
                "tensor",
                "--dims",
                "16",
                "--mode",
                "constant",
                "--rate-per-s",
                "50",
                "--duration-s",
                "1",
                "--out",
                str(tmp_path / "cli-report"),
                "--no-progress",
            ]
        )
    finally:
        assert worker.stop(grace_s=30) == 0
    out = capsys.readouterr().out
    assert status == 0
    assert f"report: {tmp_path / 'cli-report' / 'report.md'}" in out
    assert "sent 50, ok 50, errors 0" in out
    assert (tmp_path / "cli-report" / "report.png").is_file()
