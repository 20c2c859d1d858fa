"""Test helper: the library's log events (``producer.amqp.logs``) as caplog captured them."""

from __future__ import annotations

from typing import Any

import pytest


def library_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """Each captured ``qinfer.*`` event as ``{"event", "log_level", "logger", **fields}``, in order."""
    return [
        {"event": r.qinfer_event, "log_level": r.levelname.lower(), "logger": r.name, **r.qinfer_fields}
        for r in caplog.records
        if hasattr(r, "qinfer_event")
    ]
