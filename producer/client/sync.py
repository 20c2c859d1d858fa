"""The blocking client: :class:`SyncClient` runs the async :class:`~producer.client.rpc.Client` on a thread of its own.

For scripts and notebooks that have no event loop; every call blocks until the async client's call ends, with the
same arguments and exceptions.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import numpy.typing as npt

from producer.client.rpc import Client
from producer.wire.metadata import ModelMetadata
from producer.wire.names import DEFAULT_AMQP_URL
from producer.wire.protocol import InferReply

__all__ = ["SyncClient"]

T = TypeVar("T")


class SyncClient:
    """Blocking twin of :class:`Client` for scripts; runs the async client on a private thread.

    Takes the same arguments as :class:`Client` and connects at once. Use as a context manager or
    call :meth:`close`::

        with SyncClient(queue="inference") as client:
            reply = client.infer({"x": np.ones((1, 4), np.float32)}, timeout_s=5)
    """

    def __init__(self, amqp_url: str = DEFAULT_AMQP_URL, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qinfer-client", daemon=True)
        self._thread.start()
        self._client = Client(amqp_url, **kwargs)
        try:
            self._run(self._client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def infer(self, inputs: Mapping[str, npt.ArrayLike | Sequence[str]], **kwargs: Any) -> InferReply:
        """Blocking :meth:`Client.infer` (same arguments and exceptions)."""
        return self._run(self._client.infer(inputs, **kwargs))

    def infer_text(self, texts: Sequence[str], **kwargs: Any) -> InferReply:
        """Blocking :meth:`Client.infer_text` (same arguments and exceptions)."""
        return self._run(self._client.infer_text(texts, **kwargs))

    def metadata(self, **kwargs: Any) -> ModelMetadata:
        """Blocking :meth:`Client.metadata` (same arguments and exceptions)."""
        return self._run(self._client.metadata(**kwargs))

    def close(self) -> None:
        """Close the connection and stop the client's thread (idempotent)."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
