"""The worker's exception tree (the wire-level ``ProtocolError`` lives in ``producer.wire.errors``)."""

from __future__ import annotations

from producer.wire.errors import InferenceError


class WorkerError(InferenceError):
    """Raised as the base of the worker's own errors."""


class ModelLoadError(WorkerError):
    """Raised when the model cannot be loaded, or the requested device cannot run it."""


class BrokerUnavailableError(WorkerError):
    """Raised when the broker did not answer within the start-up retry window."""


class BrokerAuthenticationError(WorkerError):
    """Raised when the broker rejects the worker's credentials (never retried)."""


class BrokerRouteError(WorkerError):
    """Raised when the broker lacks what a model route needs (the consistent-hash exchange), or the route clashes."""
