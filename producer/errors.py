"""The exception tree shared by the client, the CLI and the worker's protocol layer."""

from __future__ import annotations


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
    """Raised when the broker refused (nacked) or could not route (returned) a publish."""


class ConnectionLostError(InferenceError, ConnectionError):
    """Raised when the broker connection dropped while a request awaited its reply."""
