"""The one way tests, the fault-injection harness and the benchmarks start worker processes.

A :class:`LoggedProcess` runs a command that writes JSON log lines (stdout and stderr merged). A
reader thread parses each line into an event, appends the raw line to a log file when one is given,
and wakes whoever waits: a thread (:meth:`LoggedProcess.wait_for`, :meth:`~LoggedProcess.wait`, ...)
or an event loop (the ``*_async`` twins). Both kinds of waiter check the same state under the same
lock; only the way they block differs.

:class:`WorkerProcess` is a :class:`LoggedProcess` running ``python -m worker.cli run`` (or a module
with the same CLI, such as the fault-injection worker) with the repository on ``PYTHONPATH``.

A supervisor (``worker run --processes N``) is a :class:`WorkerProcess` too: its consumer processes
share its stdout, so their events arrive in the same stream, each carrying its ``child`` slot;
:meth:`WorkerProcess.children` says which process runs in which slot now.

    with WorkerProcess(amqp_url, model, queue, "--max-batch", "16") as worker:   # tests
        ...
    async with WorkerProcess(amqp_url, model, queue, http_port=port) as worker:  # harness, benchmarks
        ...

The benchmarks import this module (as they import :mod:`tests.support.models`): it is test tooling, and a
benchmark is a test that prints ratios instead of asserting them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0
"""How long a worker may take to load and warm its model and start consuming."""
STOP_GRACE_S = 30.0
"""How long :meth:`LoggedProcess.stop` lets a process drain after SIGTERM before it sends SIGKILL."""
KILL_WAIT_S = 10.0
PROBE_INTERVAL_S = 0.05
"""Pause between two HTTP probes (as a kubelet's probe period), cut short when the process exits."""
HTTP_TIMEOUT_S = 2.0
TAIL_LINES = 200
_LOCAL_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Opens the worker's own endpoints directly, whatever proxy the environment names."""

T = TypeVar("T")


def worker_command(model: Path, queue: str, *extra: str, http_port: int = 0, module: str = "worker.cli") -> list[str]:
    """``worker run`` on ``model`` and ``queue`` as a subprocess command, logging JSON lines.

    Args:
        model: ONNX file or model folder.
        queue: request queue.
        extra: more ``worker run`` flags (``--max-batch``, ``--exit-when-idle``, ...).
        http_port: port of ``/livez``, ``/readyz`` and ``/metrics``; 0 (the default) runs no HTTP server.
        module: the module run with ``python -m``; another module with the same CLI may stand in
            (the fault-injection worker does).
    """
    command = [sys.executable, "-m", module, "run", "--model", str(model), "--queue", queue]
    return [*command, "--http-port", str(http_port), "--log-format", "json", *extra]


def child_env(amqp_url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child that imports this repository's packages.

    Args:
        amqp_url: broker URL, as ``AMQP_URL``.
        extra: more variables (``WORKER_*`` settings, ...); they win over inherited ones.
    """
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "AMQP_URL": amqp_url, "PYTHONPATH": path, **(extra or {})}


def parse_line(raw: bytes) -> dict[str, Any]:
    """One log line as an event: the JSON object, or ``{"event": "unparsed", "line": ...}``."""
    with contextlib.suppress(ValueError):
        event = json.loads(raw)
        if isinstance(event, dict):
            return event
    return {"event": "unparsed", "line": raw.decode(errors="replace").rstrip("\n")}


def metric_value(exposition: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text exposition (0 when absent)."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in exposition.splitlines():
        key, _, value = line.rpartition(" ")
        if key == want:
            return float(value)
    return 0.0


def scrape(port: int) -> str:
    """The Prometheus text that ``/metrics`` on ``127.0.0.1:port`` serves."""
    with _LOCAL_HTTP.open(f"http://127.0.0.1:{port}/metrics", timeout=HTTP_TIMEOUT_S * 2) as response:
        return str(response.read().decode())


@dataclass
class _Run:
    """One start of the process: the OS process, where its events begin, and (once read) its exit status."""

    process: subprocess.Popen[bytes]
    first_event: int
    exit_code: int | None = None


@dataclass(frozen=True)
class _Exited:
    """What a wait found when the process had exited (truthy even for exit status 0)."""

    code: int


class LoggedProcess:
    """A child process whose JSON log lines are events that threads and event loops can wait on.

    The same object can be started again once it has exited (as a Deployment restarts a pod);
    :meth:`events` then spans every run, while waits look at the current run only.

    Args:
        command: the command line.
        env: the child's whole environment (see :func:`child_env`).
        name: what messages call it.
        ready_event: the event that says it is ready, when it has no HTTP port.
        http_port: port of its ``/readyz`` and ``/metrics``; readiness is then ``/readyz`` answering 200.
        log_path: file the raw log lines are appended to (kept across restarts); None keeps none.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        name: str = "worker",
        ready_event: str = "worker_started",
        http_port: int | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.command = list(command)
        self.env = dict(env)
        self.name = name
        self.ready_event = ready_event
        self.http_port = http_port
        self.log_path = log_path
        self.starts = 0
        self._events: list[dict[str, Any]] = []
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._run: _Run | None = None
        self._reader: threading.Thread | None = None
        self._changed = threading.Condition()
        self._loop_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # -- starting and reading ----------------------------------------------------------------

    def start(self) -> Self:
        """Start the process (it is not ready yet: see :meth:`wait_ready`)."""
        if self._run is not None and self._run.exit_code is None:
            raise RuntimeError(f"{self.name} is already running")
        process = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        with self._changed:
            run = self._run = _Run(process, first_event=len(self._events))
        self.starts += 1
        self._reader = threading.Thread(target=self._read, args=(run,), name=f"{self.name}-log", daemon=True)
        self._reader.start()
        return self

    def _read(self, run: _Run) -> None:
        assert run.process.stdout is not None
        with contextlib.ExitStack() as stack:
            log = stack.enter_context(self.log_path.open("ab")) if self.log_path is not None else None
            for raw in stack.enter_context(run.process.stdout):
                if log is not None:
                    log.write(raw)
                    log.flush()
                event = parse_line(raw)
                with self._changed:
                    self._events.append(event)
                    self._tail.append(raw.decode(errors="replace").rstrip("\n"))
                    self._notify()
        code = run.process.wait()
        with self._changed:
            run.exit_code = code
            self._notify()

    def _notify(self) -> None:
        """Wake every waiter; called with the lock held, whenever an event or the exit arrives."""
        self._changed.notify_all()
        for loop, woken in self._loop_waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed; its waiter is gone
                loop.call_soon_threadsafe(woken.set)

    # -- state -------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._run is None else self._run.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status of the current run; None while it runs (or before the first start)."""
        return None if self._run is None else self._run.process.poll()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The events logged so far (over every run), or those called ``name``."""
        with self._changed:
            return [e for e in self._events if name is None or e.get("event") == name]

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` log lines, for failure messages."""
        with self._changed:
            return "\n".join(list(self._tail)[-lines:])

    def _current(self) -> _Run:
        if self._run is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._run

    def _exited(self) -> _Exited | None:
        run = self._current()
        return None if run.exit_code is None else _Exited(run.exit_code)

    def _event_or_exit(
        self, name: str, match: Mapping[str, Any] | None = None, nth: int = 1
    ) -> Callable[[], dict[str, Any] | _Exited | None]:
        run = self._current()
        wanted = dict(match or {})

        def found() -> dict[str, Any] | _Exited | None:
            seen = 0
            for event in self._events[run.first_event :]:
                if event.get("event") == name and all(event.get(k) == v for k, v in wanted.items()):
                    seen += 1
                    if seen == nth:
                        return event
            return None if run.exit_code is None else _Exited(run.exit_code)

        return found

    def _event_found(self, name: str, found: dict[str, Any] | _Exited | None, timeout_s: float) -> dict[str, Any]:
        if found is None:
            raise TimeoutError(f"{self.name} logged no {name!r} within {timeout_s:g} s; log:\n{self.log_tail()}")
        if isinstance(found, _Exited):
            raise RuntimeError(f"{self.name} exited ({found.code}) before logging {name!r}; log:\n{self.log_tail()}")
        return found

    def _not_ready(self, timeout_s: float) -> RuntimeError:
        return RuntimeError(f"{self.name} was not ready within {timeout_s:g} s; log:\n{self.log_tail()}")

    # -- the two ways to block: a thread on the condition, a coroutine on an asyncio.Event ----

    def _block(self, predicate: Callable[[], T], timeout_s: float) -> T:
        with self._changed:
            return self._changed.wait_for(predicate, timeout=max(0.0, timeout_s))

    async def _block_async(self, predicate: Callable[[], T], timeout_s: float) -> T:
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        waiter = (loop, woken)
        deadline = loop.time() + timeout_s
        with self._changed:
            self._loop_waiters.append(waiter)
        try:
            while True:
                woken.clear()
                with self._changed:
                    result = predicate()
                remaining = deadline - loop.time()
                if result is not None or remaining <= 0:
                    return result
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), remaining)
        finally:
            with self._changed:
                self._loop_waiters.remove(waiter)

    # -- waiting (threads) ---------------------------------------------------------------------

    def wait_for(
        self, name: str, *, timeout_s: float = 30.0, match: Mapping[str, Any] | None = None, nth: int = 1
    ) -> dict[str, Any]:
        """Block until the current run logs an event called ``name`` (perhaps already); return it.

        ``match``: the event must also carry these values (``{"child": 0}``); ``nth``: wait for the
        nth such event of the run (2: the second ``process_started`` of slot 0, after a restart).

        Raises:
            TimeoutError: none within ``timeout_s``.
            RuntimeError: the process exited first.
        """
        return self._event_found(name, self._block(self._event_or_exit(name, match, nth), timeout_s), timeout_s)

    def wait(self, timeout_s: float = 60.0) -> int | None:
        """The exit status once the process has exited and its log is read; None after ``timeout_s``."""
        exited = self._block(self._exited, timeout_s)
        return None if exited is None else exited.code

    def readyz(self) -> int | None:
        """The status ``/readyz`` answers, or None when nothing answers."""
        if self.http_port is None:
            raise RuntimeError(f"{self.name} has no HTTP port")
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        try:
            with _LOCAL_HTTP.open(url, timeout=HTTP_TIMEOUT_S) as response:
                return int(response.status)
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return None

    def wait_readyz(self, status: int | None, timeout_s: float = READY_TIMEOUT_S) -> bool:
        """Probe ``/readyz`` (as a kubelet would) until it answers ``status`` (None: nothing answers).

        Returns False after ``timeout_s``, or as soon as the process has exited unless ``status`` is None.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if self.readyz() == status:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (status is not None and self.returncode is not None):
                return False
            self._block(self._exited, min(PROBE_INTERVAL_S, remaining))

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> Self:
        """Block until it is ready: ``/readyz`` answers 200 when it has an HTTP port, else its ready event."""
        if self.http_port is None:
            self.wait_for(self.ready_event, timeout_s=timeout_s)
        elif not self.wait_readyz(200, timeout_s):
            raise self._not_ready(timeout_s)
        return self

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on ``/metrics`` (0 when absent)."""
        if self.http_port is None:
            raise RuntimeError(f"{self.name} has no HTTP port")
        return metric_value(scrape(self.http_port), name, **labels)

    def signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` to the current run, unless it has exited."""
        run = self._current()
        if run.process.poll() is None:
            run.process.send_signal(signum)

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM (it drains), then SIGKILL if it has not exited within ``grace_s``; the exit status.

        Safe to call again, or on a process that has exited (or never started: None).
        """
        if self._run is None:
            return None
        self.signal(signal.SIGTERM)
        code = self.wait(grace_s)
        if code is None:
            self.signal(signal.SIGKILL)
            code = self.wait(KILL_WAIT_S)
        return code

    def __enter__(self) -> Self:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- waiting (event loops) -------------------------------------------------------------------

    async def wait_for_async(
        self, name: str, *, timeout_s: float = 30.0, match: Mapping[str, Any] | None = None, nth: int = 1
    ) -> dict[str, Any]:
        """:meth:`wait_for` for a coroutine."""
        found = await self._block_async(self._event_or_exit(name, match, nth), timeout_s)
        return self._event_found(name, found, timeout_s)

    async def wait_async(self, timeout_s: float = 60.0) -> int | None:
        """:meth:`wait` for a coroutine."""
        exited = await self._block_async(self._exited, timeout_s)
        return None if exited is None else exited.code

    async def wait_readyz_async(self, status: int | None, timeout_s: float = READY_TIMEOUT_S) -> bool:
        """:meth:`wait_readyz` for a coroutine."""
        deadline = time.monotonic() + timeout_s
        while True:
            if await asyncio.to_thread(self.readyz) == status:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (status is not None and self.returncode is not None):
                return False
            await self._block_async(self._exited, min(PROBE_INTERVAL_S, remaining))

    async def wait_ready_async(self, timeout_s: float = READY_TIMEOUT_S) -> Self:
        """:meth:`wait_ready` for a coroutine."""
        if self.http_port is None:
            await self.wait_for_async(self.ready_event, timeout_s=timeout_s)
        elif not await self.wait_readyz_async(200, timeout_s):
            raise self._not_ready(timeout_s)
        return self

    async def metric_async(self, name: str, **labels: str) -> float:
        """:meth:`metric` for a coroutine."""
        return await asyncio.to_thread(self.metric, name, **labels)

    async def stop_async(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """:meth:`stop` for a coroutine."""
        if self._run is None:
            return None
        self.signal(signal.SIGTERM)
        code = await self.wait_async(grace_s)
        if code is None:
            self.signal(signal.SIGKILL)
            code = await self.wait_async(KILL_WAIT_S)
        return code

    async def __aenter__(self) -> Self:
        self.start()
        try:
            return await self.wait_ready_async()
        except BaseException:
            await self.stop_async()
            raise

    async def __aexit__(self, *_: object) -> None:
        await self.stop_async()


class WorkerProcess(LoggedProcess):
    """``worker run`` in a subprocess (see :func:`worker_command`), its JSON log lines as events.

    Args:
        amqp_url: broker URL.
        model: ONNX file or model folder.
        queue: request queue.
        extra: more ``worker run`` flags.
        http_port: port of its HTTP endpoints; None (the default) runs no HTTP server, and readiness
            is then its ``worker_started`` event.
        env: more environment variables (``WORKER_*`` settings, ...).
        module: module with the ``worker`` CLI to run (default ``worker.cli``).
        name: what messages call it.
        log_path: file the log lines are appended to.
    """

    def __init__(
        self,
        amqp_url: str,
        model: Path,
        queue: str,
        *extra: str,
        http_port: int | None = None,
        env: Mapping[str, str] | None = None,
        module: str = "worker.cli",
        name: str = "worker",
        log_path: Path | None = None,
    ) -> None:
        command = worker_command(model, queue, *extra, http_port=http_port or 0, module=module)
        super().__init__(command, env=child_env(amqp_url, env), name=name, http_port=http_port, log_path=log_path)
        self.queue = queue

    # -- a supervisor's consumer processes (``--processes N``) -----------------------------------

    def children(self) -> dict[int, dict[str, Any]]:
        """The consumer process now in each slot: its latest ``process_started`` event (pid, http_port)."""
        return {int(e["child"]): e for e in self.events("process_started")}

    def child_metric(self, slot: int, name: str, **labels: str) -> float:
        """One sample on the ``/metrics`` of the consumer process in ``slot`` (its own counts only)."""
        return metric_value(scrape(int(self.children()[slot]["http_port"])), name, **labels)
