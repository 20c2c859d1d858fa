"""The worker-process launcher (tests.support.worker_process) against small real child processes; no broker."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.support.worker_process import REPO_ROOT, LoggedProcess, child_env, metric_value, parse_line, worker_command

CHILD = """
import json, signal, sys
def log(event, **values):
    print(json.dumps({"event": event, **values}), flush=True)
mode = sys.argv[1]
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: (log("terminated"), sys.exit(0)))
log("worker_started", mode=mode)
print("not json", flush=True)
if mode == "exit":
    sys.exit(3)
while True:
    signal.pause()
"""


def _child(mode: str, log_path: Path | None = None) -> LoggedProcess:
    return LoggedProcess([sys.executable, "-c", CHILD, mode], env=dict(os.environ), name=mode, log_path=log_path)


def test_events_are_waited_on_from_a_thread_and_sigterm_stops_the_process(tmp_path: Path) -> None:
    log_path = tmp_path / "child.log"
    with _child("serve", log_path) as child:  # ready: its worker_started event
        assert child.events("worker_started") == [{"event": "worker_started", "mode": "serve"}]
        assert child.wait_for("unparsed")["line"] == "not json"
        assert child.returncode is None
    assert child.wait(0) == 0
    assert child.events("terminated")
    lines = log_path.read_text().splitlines()
    assert json.loads(lines[0])["event"] == "worker_started"
    assert lines[1] == "not json"


async def test_events_are_waited_on_from_an_event_loop_and_sigterm_stops_the_process() -> None:
    async with _child("serve") as child:
        assert (await child.wait_for_async("unparsed"))["line"] == "not json"
        with pytest.raises(TimeoutError, match="logged no 'never'"):
            await child.wait_for_async("never", timeout_s=0.1)
    assert await child.wait_async(0) == 0
    assert child.events("terminated")


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    child = _child("ignore-term").start().wait_ready()
    assert child.stop(grace_s=0.2) == -signal.SIGKILL
    assert child.stop() == -signal.SIGKILL  # stopping again only reads the status


async def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_from_an_event_loop() -> None:
    child = await _child("ignore-term").start().wait_ready_async()
    assert await child.stop_async(grace_s=0.2) == -signal.SIGKILL


def test_waiting_for_an_event_fails_fast_when_the_process_exits_first() -> None:
    child = _child("exit").start()
    with pytest.raises(RuntimeError, match=r"exited \(3\) before logging 'never'"):
        child.wait_for("never", timeout_s=30)
    assert child.wait(5) == 3


def test_a_restarted_process_keeps_its_events_and_waits_look_at_the_current_run(tmp_path: Path) -> None:
    child = _child("exit", tmp_path / "child.log").start()
    assert child.wait(30) == 3
    child.start()
    assert child.starts == 2
    assert child.wait(30) == 3
    assert len(child.events("worker_started")) == 2
    assert len((tmp_path / "child.log").read_text().splitlines()) == 4


def test_log_lines_parse_into_events() -> None:
    assert parse_line(b'{"event": "worker_started", "queue": "q"}\n') == {"event": "worker_started", "queue": "q"}
    assert parse_line(b"Traceback (most recent call last):\n") == {
        "event": "unparsed",
        "line": "Traceback (most recent call last):",
    }
    assert parse_line(b"[1, 2]\n")["event"] == "unparsed"


def test_a_metric_sample_is_found_by_name_and_labels() -> None:
    exposition = 'qinfer_rows_total 196.0\nqinfer_requests_total{outcome="ok"} 7.0\n'
    assert metric_value(exposition, "qinfer_rows_total") == 196.0
    assert metric_value(exposition, "qinfer_requests_total", outcome="ok") == 7.0
    assert metric_value(exposition, "qinfer_requests_total", outcome="reply_held") == 0.0


def test_the_worker_command_logs_json_and_the_child_imports_this_repository(tmp_path: Path) -> None:
    command = worker_command(tmp_path / "m.onnx", "q", "--max-batch", "8")
    assert command[:3] == [sys.executable, "-m", "worker.cli"]
    assert command[3:] == [
        *("run", "--model", str(tmp_path / "m.onnx"), "--queue", "q"),
        *("--http-port", "0", "--log-format", "json", "--max-batch", "8"),
    ]
    assert worker_command(tmp_path / "m.onnx", "q", http_port=9100, module="tests.chaos.crashing_worker")[2:7] == [
        "tests.chaos.crashing_worker",
        *("run", "--model", str(tmp_path / "m.onnx"), "--queue"),
    ]
    env = child_env("amqp://broker/", {"WORKER_MAX_BATCH": "8"})
    assert env["AMQP_URL"] == "amqp://broker/"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT)
    assert env["WORKER_MAX_BATCH"] == "8"
