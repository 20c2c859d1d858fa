"""The exception tree shared by the client, the CLI and the worker's protocol layer."""

from __future__ import annotations

import reprlib

CLIP_CHARS = 200
"""Most characters of one echoed input value in an error message (see :func:`clip`)."""


class _BoundedRepr(reprlib.Repr):
    """``reprlib`` bounds on strings, lists and nesting, plus bytes (which ``reprlib`` leaves whole)."""

    ITEMS = 16
    """Most items of a list, tuple or dict shown."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxstring = self.maxother = self.maxlong = limit
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdict = self.ITEMS
        self.maxlevel = 3

    def repr_bytes(self, x: bytes, level: int) -> str:
        return repr(x[: self.maxstring]) + ("..." if len(x) > self.maxstring else "")

    def repr_bytearray(self, x: bytearray, level: int) -> str:
        return self.repr_bytes(bytes(x[: self.maxstring + 1]), level)


def clip(value: object, limit: int = CLIP_CHARS) -> str:
    """A bounded ``repr`` of a value taken from a message, for echoing in an error message.

    Strings, bytes and lists are cut before they are rendered, so a hostile 100 MB field costs
    no more than a short one; a cut value says how long it was.

    Args:
        value: what to echo (a name, a datatype, a shape, a list of names, a number...).
        limit: most characters of the result, default :data:`CLIP_CHARS`.
    """
    try:
        text = _BoundedRepr(limit).repr(value)
    except Exception:  # a repr that fails must not turn an error message into a crash
        return f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if isinstance(value, str | bytes | bytearray) and len(value) > limit:
        text += f" ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    elif isinstance(value, list | tuple | dict) and len(value) > _BoundedRepr.ITEMS:
        text += f" ({len(value)} items)"
    return text


class InferenceError(Exception):
    """Raised as the base of every error this project raises on purpose."""


class ProtocolError(InferenceError):
    """Raised when a message violates the wire contract; carries a stable error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ErrorReplyError(InferenceError):
    """Raised when the worker answered a request with an error reply."""

    def __init__(self, request_id: str, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.request_id = request_id
        self.code = code
        self.message = message


class RequestTimeoutError(InferenceError, TimeoutError):
    """Raised when no reply arrived before the request's deadline."""


class PublishRefusedError(InferenceError):
    """Raised when the broker refused (nacked) or could not route (returned) a publish.

    ``reason`` says which way, for callers that word the advice themselves (see
    :class:`producer.amqp.publish.Refusal`).
    """

    def __init__(self, message: str, *, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


class ConnectionLostError(InferenceError, ConnectionError):
    """Raised when the broker connection dropped while a request awaited its reply."""


class BrokerTlsError(InferenceError):
    """Raised when TLS to the broker cannot work (unusable certificate files, or a refused handshake); not retried."""
