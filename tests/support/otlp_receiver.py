"""A real OTLP/HTTP trace receiver on 127.0.0.1: decodes the protobuf exports a worker sends.

``OtlpReceiver`` runs in the test's event loop and keeps every span it receives. Run as a module it
serves until SIGTERM and only counts spans (a sink for the tracing benchmark), printing one JSON
line ``{"event": "ready", "port": N}`` when it listens and ``{"event": "received", "spans": N}`` at exit.

Usage: python -m tests.support.otlp_receiver [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver decoded it (ids as lowercase hex, as W3C headers write them)."""

    name: str
    kind: int  # the OTLP enum: 1 internal, 2 server, 3 client, 4 producer, 5 consumer
    trace_id: str
    span_id: str
    parent_span_id: str
    status_code: int  # 0 unset, 1 ok, 2 error
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace id, span id)
    resource: dict[str, Any]


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def decode_export(body: bytes) -> list[ReceivedSpan]:
    """The spans of one OTLP ``ExportTraceServiceRequest`` body."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=s.name,
                        kind=s.kind,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        status_code=s.status.code,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        resource=resource,
                    )
                )
    return spans


class OtlpReceiver:
    """An OTLP/HTTP (protobuf) endpoint on a free port of 127.0.0.1; ``spans`` grows as exports arrive.

    Args:
        keep: keep the decoded spans (False: only count them).
    """

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.spans: list[ReceivedSpan] = []
        self.count = 0
        self.port = 0
        self._arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        """The base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}"

    async def _export(self, request: web.Request) -> web.Response:
        spans = decode_export(await request.read())
        self.count += len(spans)
        if self.keep:
            self.spans += spans
        self._arrived.set()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(TRACES_PATH, self._export)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def wait_for(self, predicate: Any, *, timeout_s: float = 20.0) -> list[ReceivedSpan]:
        """Wait until ``predicate(spans)`` is true (checked at each export); return the spans."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self.spans):
                self._arrived.clear()
                await self._arrived.wait()
        return self.spans


async def _serve(port: int) -> None:
    receiver = OtlpReceiver(keep=False)
    receiver.port = port
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with receiver:
        print(json.dumps({"event": "ready", "port": receiver.port}), flush=True)
        await stop.wait()
    print(json.dumps({"event": "received", "spans": receiver.count}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    asyncio.run(_serve(parser.parse_args().port))
