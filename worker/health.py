"""HTTP endpoints for Kubernetes and Prometheus: ``/livez``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


@dataclasses.dataclass
class HealthState:
    """What readiness is made of. The consumer flips these as it starts, loses the broker, drains."""

    warmed: bool = False
    consuming: bool = False
    draining: bool = False
    stalled: bool = False
    """The prefetch window is full and nothing has settled for ``WORKER_STALL_S``."""

    @property
    def ready(self) -> bool:
        """Model warmed, consuming, not draining and not stalled."""
        return self.warmed and self.consuming and not self.draining and not self.stalled

    def as_dict(self) -> dict[str, bool]:
        return {**dataclasses.asdict(self), "ready": self.ready}


Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
"""Answers whether to report ready, and the body ``/readyz`` shows."""

SUPERVISED_ENV = "QINFER_CHILD_INDEX"
"""Set by the supervisor (``worker run --processes N``) in each consumer process it starts."""


def make_app(state: HealthState, registry: CollectorRegistry) -> web.Application:
    """The aiohttp application serving the three endpoints of one worker."""

    async def readiness() -> tuple[bool, dict[str, Any]]:
        return state.ready, state.as_dict()

    return endpoints_app(readiness, lambda: generate_latest(registry))


def endpoints_app(readiness: Readiness, exposition: Callable[[], bytes]) -> web.Application:
    """``/livez``, ``/readyz`` (from ``readiness``) and ``/metrics`` (``exposition``: Prometheus text)."""

    async def livez(_: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def readyz(_: web.Request) -> web.Response:
        ready, body = await readiness()
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve_http(app: web.Application, port: int, host: str | None = None) -> web.AppRunner:
    """Serve ``app`` on ``host:port``; ``await runner.cleanup()`` stops it.

    ``host`` defaults to every interface, or to the loopback interface in a consumer process that a
    supervisor started: there the pod's port belongs to the supervisor, which probes this one.
    """
    if host is None:
        host = "127.0.0.1" if SUPERVISED_ENV in os.environ else "0.0.0.0"
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def start_http_server(state: HealthState, registry: CollectorRegistry, port: int) -> web.AppRunner:
    """Serve one worker's endpoints on ``port`` (see :func:`serve_http`)."""
    return await serve_http(make_app(state, registry), port)
