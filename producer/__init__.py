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
"""

from producer.bulk import BulkJob, BulkOptions, BulkSummary, JobFailedError
from producer.client import Client, SyncClient
from producer.errors import (
    ConnectionLostError,
    ErrorReplyError,
    InferenceError,
    ProtocolError,
    PublishRefusedError,
    RequestTimeoutError,
)
from producer.protocol import ErrorCode, InferReply

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
    "ProtocolError",
    "PublishRefusedError",
    "RequestTimeoutError",
    "SyncClient",
]
