"""HTTP endpoints for Kubernetes and Prometheus: ``/livez``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

import dataclasses

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


def make_app(state: HealthState, registry: CollectorRegistry) -> web.Application:
    """The aiohttp application serving the three endpoints."""

    async def livez(_: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def readyz(_: web.Request) -> web.Response:
        return web.json_response(state.as_dict(), status=200 if state.ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def start_http_server(state: HealthState, registry: CollectorRegistry, port: int) -> web.AppRunner:
    """Serve the endpoints on ``0.0.0.0:port``; ``await runner.cleanup()`` stops it."""
    runner = web.AppRunner(make_app(state, registry), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner
