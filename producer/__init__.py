"""qinfer producer: the wire contract, an async RPC client, bulk jobs and the ``producer`` CLI.

Importable without ONNX Runtime. The client in ten lines::

    import asyncio
    import numpy as np
    from producer import Client

    async def main() -> None:
        async with Client("amqp://guest:guest@localhost/", queue="inference") as client:
            reply = await client.infer({"x": np.ones((2, 4), np.float32)}, timeout_s=5)
            print(reply.outputs)

    asyncio.run(main())

The package is layered (see the README's architecture table)::

    client, bulk, loadtest, cli, worker  ->  amqp  ->  wire

Importing ``producer`` loads nothing below it: the names here are imported on first use, so the worker, which
needs only ``producer.wire`` and ``producer.amqp``, never loads the client or the bulk-job code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from producer.bulk.job import BulkJob, BulkOptions, BulkSummary, JobFailedError
    from producer.client import Client, SyncClient
    from producer.wire.errors import (
        ConnectionLostError,
        ErrorReplyError,
        InferenceError,
        ProtocolError,
        PublishRefusedError,
        RequestTimeoutError,
    )
    from producer.wire.metadata import ModelMetadata
    from producer.wire.protocol import ErrorCode, InferReply

_EXPORTS = {
    "BulkJob": "producer.bulk.job",
    "BulkOptions": "producer.bulk.job",
    "BulkSummary": "producer.bulk.job",
    "JobFailedError": "producer.bulk.job",
    "Client": "producer.client",
    "SyncClient": "producer.client",
    "ConnectionLostError": "producer.wire.errors",
    "ErrorReplyError": "producer.wire.errors",
    "InferenceError": "producer.wire.errors",
    "ProtocolError": "producer.wire.errors",
    "PublishRefusedError": "producer.wire.errors",
    "RequestTimeoutError": "producer.wire.errors",
    "ErrorCode": "producer.wire.protocol",
    "InferReply": "producer.wire.protocol",
    "ModelMetadata": "producer.wire.metadata",
}

__all__ = [
    "BulkJob",
    "BulkOptions",
    "BulkSummary",
    "Client",
    "ConnectionLostError",
    "ErrorCode",
    "ErrorReplyError",
    "InferReply",
    "InferenceError",
    "JobFailedError",
    "ModelMetadata",
    "ProtocolError",
    "PublishRefusedError",
    "RequestTimeoutError",
    "SyncClient",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'producer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
