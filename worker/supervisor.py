"""``worker run --processes N``: one supervisor process, N consumer processes on the same device.

One consumer process (its event loop: receive, decode, reply, ack) keeps about one core busy; an
accelerator needs several such processes to be fed. The supervisor starts N consumer processes
(``python -m worker.cli run`` with ``--processes 1``: exactly the single-process worker), each with
its own broker connections and its own ONNX Runtime session on the same device, and stands for the
pod:

* ``/livez`` while the supervisor runs; ``/readyz`` 200 when every consumer process answers 200 on
  its own ``/readyz`` (served on the loopback interface, on a port the supervisor picks) and no drain
  has begun; ``/metrics``: the sum over the processes.
* Metrics use prometheus-client's multiprocess mode, the library's own answer for forked servers:
  each consumer starts with ``PROMETHEUS_MULTIPROC_DIR`` set to a fresh directory, where the library
  keeps every value in a per-process file (set before the library creates a metric: it reads the
  variable at import), and the supervisor's ``/metrics`` reads them all with ``MultiProcessCollector``.
  Counters and histograms add up exactly, including the counts of processes that died; the in-flight
  gauge sums over live processes only (``livesum``), its files removed when a process dies. Chosen
  over scraping and summing each process's endpoint: a process that died takes its counts with it
  there, and summing histograms and gauges by hand is what the library already does.
* SIGTERM or SIGINT: each consumer process gets SIGTERM and drains as a lone worker does; the
  supervisor exits 0 only if every one of them exited 0.
* A consumer process that dies is started again after a backoff (0.5 s, doubling with each death of
  that process within ``--death-window-s``, at most ``--restart-backoff-max-s``). ``--max-deaths``
  deaths within the window make the supervisor drain the others and exit 1, so Kubernetes restarts
  the pod instead of the supervisor hiding a crash loop.

Consumer processes are started with a parent-death signal (SIGTERM): if the supervisor itself is
killed, they drain and exit rather than linger.

Called by ``worker.cli``; starts ``worker.cli`` processes; imports nothing of the request path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from worker.health import SUPERVISED_ENV, endpoints_app, serve_http
from worker.metrics import MULTIPROC_DIR_ENV
from worker.settings import Settings, to_env

log = structlog.get_logger("worker.supervisor")

CHILD_INDEX_ENV = SUPERVISED_ENV
"""Set in each consumer process's environment: its slot (0 to N-1), for its log lines and loopback binding."""
FIRST_BACKOFF_S = 0.5
DRAIN_MARGIN_S = 10.0
"""Beyond ``--drain-timeout-s``, how long a consumer process may take to close before it is killed."""
_PROBE_TIMEOUT_S = 1.0
_PR_SET_PDEATHSIG = 1
_CGROUP_ROOT = Path("/sys/fs/cgroup")


# ---------------------------------------------------------------------------------------------
# How many processes: ``auto``


def cgroup_cpu_limit(root: Path = _CGROUP_ROOT) -> float | None:
    """CPUs the cgroup quota allows (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``), None if unlimited."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = (root / "cpu.max").read_text().split()
        if fields[0] == "max":
            return None
        return int(fields[0]) / int(fields[1])
    with contextlib.suppress(OSError, ValueError):
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    return None


def available_cpus(root: Path = _CGROUP_ROOT) -> int:
    """The CPUs this container may use: the cores it may run on, capped by its cgroup quota (rounded up)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    return max(1, min(cores, math.ceil(limit)) if limit is not None else cores)


def resolve_processes(settings: Settings, root: Path = _CGROUP_ROOT) -> int:
    """``--processes``, with 0 (``auto``) resolved to :func:`available_cpus`."""
    return settings.processes or available_cpus(root)


# ---------------------------------------------------------------------------------------------
# Restart policy (pure)


@dataclasses.dataclass
class DeathBudget:
    """Deaths within a sliding window: the restart backoff and when to give up.

    Args:
        max_deaths: deaths within ``window_s`` that exhaust the budget.
        window_s: the window, in seconds.
        backoff_max_s: the longest restart delay.
    """

    max_deaths: int
    window_s: float
    backoff_max_s: float
    _deaths: collections.deque[tuple[float, int]] = dataclasses.field(default_factory=collections.deque)

    def record(self, slot: int, now_s: float) -> None:
        """A consumer process in ``slot`` died at ``now_s`` (monotonic seconds)."""
        self._deaths.append((now_s, slot))
        self._prune(now_s)

    def _prune(self, now_s: float) -> None:
        while self._deaths and self._deaths[0][0] <= now_s - self.window_s:
            self._deaths.popleft()

    def in_window(self, now_s: float) -> int:
        """Deaths, of any slot, within the window."""
        self._prune(now_s)
        return len(self._deaths)

    def exhausted(self, now_s: float) -> bool:
        """True once ``max_deaths`` deaths fall within the window."""
        return self.in_window(now_s) >= self.max_deaths

    def backoff_s(self, slot: int, now_s: float) -> float:
        """How long to wait before starting ``slot`` again: doubling with its deaths in the window."""
        self._prune(now_s)
        deaths = sum(1 for _, s in self._deaths if s == slot)
        return float(min(self.backoff_max_s, FIRST_BACKOFF_S * 2 ** max(0, deaths - 1)))


# ---------------------------------------------------------------------------------------------
# The supervisor


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send SIGTERM to the child when the supervisor dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def set_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return set_signal


def _describe_exit(code: int) -> dict[str, Any]:
    if code < 0:
        return {"exit_code": code, "signal": signal.Signals(-code).name}
    return {"exit_code": code}


@dataclasses.dataclass
class _Child:
    """One slot: the consumer process running in it now (if any) and how the last one ended."""

    slot: int
    process: asyncio.subprocess.Process | None = None
    http_port: int = 0
    exit_code: int | None = None
    finished: bool = False
    """Exited 0 on its own (``--exit-when-idle``): not started again."""


class Supervisor:
    """Runs ``processes`` consumer processes of ``settings`` until stopped; see the module docstring.

    Args:
        settings: validated settings; each consumer process gets them with ``--processes 1``.
        processes: how many consumer processes (at least 1; already resolved from ``auto``).
        install_signal_handlers: drain on SIGTERM/SIGINT; off when a caller drives shutdown itself.
    """

    def __init__(self, settings: Settings, processes: int, *, install_signal_handlers: bool = True) -> None:
        if processes < 1:
            raise ValueError("a supervisor needs at least one consumer process")
        self.settings = settings
        self.processes = processes
        self.install_signal_handlers = install_signal_handlers
        self.stop_event = asyncio.Event()
        self.budget = DeathBudget(settings.max_deaths, settings.death_window_s, settings.restart_backoff_max_s)
        self.failed = False
        self.draining = False
        self.restarts = 0
        self._children = [_Child(slot) for slot in range(processes)]
        self._metrics_dir = Path(tempfile.mkdtemp(prefix="qinfer-metrics-"))
        self._own = CollectorRegistry()
        self._restarts = Counter(
            "qinfer_process_restarts_total",
            "Consumer processes started again after one died",
            registry=self._own,
        )
        self._running = Gauge("qinfer_processes", "Consumer processes running now", registry=self._own)
        self._preexec = _parent_death_signal()
        self._http: aiohttp.ClientSession | None = None

    # -- life cycle ------------------------------------------------------------------------------

    async def run(self) -> int:
        """Start the consumer processes, serve the endpoints, restart the dead, drain on a signal.

        Returns:
            0 when every consumer process drained (or finished) cleanly; 1 otherwise, including when
            the death budget ran out.
        """
        loop = asyncio.get_running_loop()
        if self.install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
        server = None
        watchers: list[asyncio.Task[None]] = []
        try:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_PROBE_TIMEOUT_S))
            if self.settings.http_port:
                server = await serve_http(endpoints_app(self._readiness, self._exposition), self.settings.http_port)
            log.info(
                "supervisor_started",
                processes=self.processes,
                http_port=self.settings.http_port or None,
                max_deaths=self.settings.max_deaths,
                death_window_s=self.settings.death_window_s,
            )
            watchers = [asyncio.create_task(self._watch(child), name=f"child-{child.slot}") for child in self._children]
            await self.stop_event.wait()
            await self._drain(watchers)
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            await self._kill_all()
            if server is not None:
                await server.cleanup()
            if self._http is not None:
                await self._http.close()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            if self.install_signal_handlers:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        clean = not self.failed and all(c.exit_code == 0 for c in self._children)
        log.info(
            "supervisor_stopped",
            clean=clean,
            exit_codes=[c.exit_code for c in self._children],
            restarts=self.restarts,
        )
        return 0 if clean else 1

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self.stop_event.is_set():
            log.info("supervisor_draining", signal=sig.name, processes=self.processes)
        self.stop_event.set()

    async def _drain(self, watchers: list[asyncio.Task[None]]) -> None:
        """SIGTERM to every consumer process; wait for them to drain, killing any that outlast the drain."""
        self.draining = True
        for child in self._children:
            if child.process is not None and child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        _, pending = await asyncio.wait(watchers, timeout=self.settings.drain_timeout_s + DRAIN_MARGIN_S)
        if pending:
            log.error(
                "drain_overran",
                slots=[c.slot for c in self._children if c.process is not None and c.process.returncode is None],
                why=f"still running {self.settings.drain_timeout_s + DRAIN_MARGIN_S:g} s after SIGTERM; killed",
            )
            await self._kill_all()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _kill_all(self) -> None:
        for child in self._children:
            process = child.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                child.exit_code = await process.wait()

    # -- one slot ----------------------------------------------------------------------------------

    async def _watch(self, child: _Child) -> None:
        """Run ``child``'s slot: start a consumer process, wait for its exit, start it again after a backoff."""
        while not self.draining:
            try:
                process = await self._spawn(child)
            except OSError as e:  # no interpreter to exec, no memory to fork: nothing to restart
                log.error(
                    "process_start_failed", child=child.slot, error=repr(e), why="the pod cannot run its processes"
                )
                self.failed = True
                self.stop_event.set()
                return
            if self.draining:  # the drain began while it was starting: it drains too
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
            code = await process.wait()
            child.exit_code = code
            self._running.dec()
            mark_process_dead(process.pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]
            if self.draining:
                log.info("process_drained", child=child.slot, pid=process.pid, **_describe_exit(code))
                return
            if code == 0 and self.settings.exit_when_idle:
                child.finished = True
                log.info("process_finished", child=child.slot, pid=process.pid)
                if all(c.finished for c in self._children):
                    self.stop_event.set()
                return
            now_s = time.monotonic()
            self.budget.record(child.slot, now_s)
            deaths = self.budget.in_window(now_s)
            log.warning(
                "process_died",
                child=child.slot,
                pid=process.pid,
                deaths_in_window=deaths,
                death_window_s=self.settings.death_window_s,
                **_describe_exit(code),
            )
            if self.budget.exhausted(now_s):
                self.failed = True
                log.error(
                    "too_many_process_deaths",
                    deaths=deaths,
                    death_window_s=self.settings.death_window_s,
                    why="consumer processes keep dying; draining the others and exiting 1 so that Kubernetes "
                    "restarts the pod (their logs above say why they died)",
                )
                self.stop_event.set()
                return
            delay_s = self.budget.backoff_s(child.slot, now_s)
            log.info("process_restarting", child=child.slot, delay_s=delay_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), delay_s)
            if self.stop_event.is_set():
                return
            self.restarts += 1
            self._restarts.inc()

    async def _spawn(self, child: _Child) -> asyncio.subprocess.Process:
        child.http_port = _free_loopback_port() if self.settings.http_port else 0
        env = {
            **os.environ,
            **to_env(self.settings),
            "WORKER_PROCESSES": "1",
            "WORKER_HTTP_PORT": str(child.http_port),
            MULTIPROC_DIR_ENV: str(self._metrics_dir),
            CHILD_INDEX_ENV: str(child.slot),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker.cli",
            "run",
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=self._preexec,
        )
        child.process = process
        child.exit_code = None
        self._running.inc()
        log.info("process_started", child=child.slot, pid=process.pid, http_port=child.http_port or None)
        return process

    # -- endpoints -------------------------------------------------------------------------------

    async def _child_ready(self, child: _Child) -> bool:
        process = child.process
        if process is None or process.returncode is not None or not child.http_port or self._http is None:
            return False
        try:
            async with self._http.get(f"http://127.0.0.1:{child.http_port}/readyz") as response:
                return response.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def _readiness(self) -> tuple[bool, dict[str, Any]]:
        states = await asyncio.gather(*(self._child_ready(c) for c in self._children))
        ready = not self.draining and all(states)
        return ready, {"ready": ready, "draining": self.draining, "processes": list(states)}

    def _exposition(self) -> bytes:
        summed = CollectorRegistry()
        MultiProcessCollector(summed, path=str(self._metrics_dir))  # type: ignore[no-untyped-call]
        return generate_latest(summed) + generate_latest(self._own)
