"""The load-test report: every section, the plot and the raw samples, from recorded timings."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from producer.cli import build_parser, main
from producer.loadtest.payloads import PayloadSpec
from producer.loadtest.profiles import Profile
from producer.loadtest.report import MARKDOWN_SECTIONS, ReportContext, write_report
from producer.loadtest.runner import RunResult
from producer.loadtest.stats import NO_REPLY, OK, DepthReading, Sample, summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _recorded_run() -> tuple[RunResult, Profile]:
    profile = Profile(
        mode="burst", rate_per_s=10, burst_rate_per_s=50, burst_start_s=1, burst_duration_s=1, duration_s=3
    )
    samples = []
    for i in range(80):
        due = i * 0.0375
        latency_s = 0.01 + (0.2 if 1 <= due < 2.2 else 0.0)
        samples.append(
            Sample(
                index=i,
                scheduled_s=due,
                sent_s=due + 0.001,
                confirmed_s=due + 0.002,
                rows=2,
                replied_s=due + latency_s,
                outcome=OK,
                timing={
                    "broker_ms": 2.0,
                    "batch_wait_ms": 1.0,
                    "compute_ms": 4.0,
                    "batch_rows": 4,
                    "batch_requests": 2,
                },
            )
        )
    samples.append(Sample(index=80, scheduled_s=2.9, sent_s=2.9, rows=2, outcome=NO_REPLY))
    depth = [DepthReading(t_s=t / 4, ready=max(0, 30 - abs(int(t) - 8) * 5)) for t in range(14)]
    return RunResult(samples=samples, depth=depth, started_epoch_s=1.7e9, send_duration_s=3.0, consumers=1), profile


def test_report_has_every_section_the_plot_and_one_csv_line_per_request(tmp_path: Path) -> None:
    result, profile = _recorded_run()
    summary = summarize(result.samples, send_duration_s=3.0, depth=result.depth, settled_after_s=2.0)
    paths = write_report(
        tmp_path / "report",
        summary=summary,
        result=result,
        profile=profile,
        payload=PayloadSpec(kind="text", rows=2),
        context=ReportContext(queue="q", amqp_url="amqp://***@host/", depth_source="passive queue declare"),
    )
    text = paths["markdown"].read_text()
    headings = [line.removeprefix("## ") for line in text.splitlines() if line.startswith("## ")]
    assert headings == list(MARKDOWN_SECTIONS)
    assert "| no_reply | 1 |" in text
    assert "(report.png)" in text
    document = json.loads(paths["json"].read_text())
    assert document["summary"]["sent"] == 81
    assert document["summary"]["errors"] == {"no_reply": 1}
    assert [s["stage"] for s in document["summary"]["stages"]] == [
        "send_lag",
        "broker",
        "batch_wait",
        "compute",
        "return",
    ]
    assert document["summary"]["batches"]["bins"] == [{"min_rows": 3, "max_rows": 4, "batches": 40.0, "requests": 80}]
    assert document["profile"]["mode"] == "burst"
    assert len(document["depth"]) == 14
    assert paths["plot"].read_bytes().startswith(PNG_SIGNATURE)
    with paths["samples"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 81
    assert rows[0]["outcome"] == OK
    assert float(rows[0]["latency_ms"]) == pytest.approx(10.0)
    assert rows[-1]["replied_s"] == ""


def test_the_producer_cli_has_a_load_test_command_with_the_default_burst() -> None:
    args = build_parser().parse_args(["load-test", "--queue", "q"])
    assert isinstance(args, argparse.Namespace)
    assert (args.command, args.mode, args.payload, args.rows) == ("load-test", "burst", "text", 1)


def test_an_invalid_load_option_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load-test", "--mode", "constant", "--rate-per-s", "0"]) == 2
    assert "--rate-per-s" in capsys.readouterr().err
