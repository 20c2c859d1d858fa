"""Test helper: a real ``worker run`` process whose JSON log events the test can wait on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from tests.workers import worker_command

STARTUP_TIMEOUT_S = 60.0
REPO_ROOT = Path(__file__).resolve().parents[2]


def child_env(amqp_url: str) -> dict[str, str]:
    """Environment for a child process that imports this repository's packages."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "AMQP_URL": amqp_url, "PYTHONPATH": path}


class WorkerProcess:
    """``python -m worker.cli run`` in a subprocess; its stderr JSON log lines become events.

    Args:
        amqp_url: broker URL.
        model: ONNX model path.
        queue: request queue.
        extra: more ``worker run`` flags (``--max-batch``, ``--exit-when-idle``, ...).
    """

    def __init__(self, amqp_url: str, model: Path, queue: str, *extra: str) -> None:
        self.command = worker_command(model, queue, *extra)
        self.env = child_env(amqp_url)
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> WorkerProcess:
        """Start the worker and return once it consumes (its ``worker_started`` event)."""
        self._process = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for("worker_started", timeout_s=STARTUP_TIMEOUT_S)
        return self

    def _read(self) -> None:
        assert self._process is not None
        assert self._process.stderr is not None
        with self._process.stderr as lines:
            for raw in lines:
                try:
                    event = json.loads(raw)
                except ValueError:
                    event = {"event": "unparsed", "line": raw.decode(errors="replace")}
                with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()
        with self._changed:
            self.events.append({"event": "<exited>"})
            self._changed.notify_all()

    def named(self, name: str) -> list[dict[str, Any]]:
        """The events so far with this name."""
        with self._changed:
            return [e for e in self.events if e.get("event") == name]

    def wait_for(self, name: str, *, timeout_s: float = 30.0) -> dict[str, Any]:
        """Block until an event called ``name`` is logged; fails if the worker exits first."""

        def found() -> dict[str, Any] | None:
            for event in self.events:
                if event.get("event") in (name, "<exited>"):
                    return event
            return None

        with self._changed:
            event = self._changed.wait_for(found, timeout=timeout_s)
        if event is None:
            raise TimeoutError(f"worker logged no {name!r} within {timeout_s:g} s; events: {self.events[-5:]}")
        if event["event"] != name:
            raise RuntimeError(f"worker exited before logging {name!r}; last events: {self.events[-8:]}")
        return event

    def signal(self, signum: signal.Signals) -> None:
        """Send a signal to the worker."""
        assert self._process is not None
        self._process.send_signal(signum)

    def wait(self, timeout_s: float = 60.0) -> int:
        """Wait for the worker to exit; returns its exit status."""
        assert self._process is not None
        code = self._process.wait(timeout=timeout_s)
        if self._reader is not None:
            self._reader.join(timeout=timeout_s)
        return code

    def stop(self) -> None:
        """SIGTERM (drain), then SIGKILL if it does not exit in time. Safe to call twice."""
        if self._process is None or self._process.poll() is not None:
            if self._process is not None:
                self.wait()
            return
        self._process.terminate()
        try:
            self.wait(timeout_s=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self.wait()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
