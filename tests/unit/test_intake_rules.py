"""The pure rules intake and the scheduler apply before any work: header values and deadlines."""

from __future__ import annotations

from typing import Any

import pytest

from worker.intake import header_ms
from worker.scheduler import is_expired


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-deadline-ms": 1700000000000}, 1.7e12),
        ({"x-deadline-ms": 12.5}, 12.5),
        ({"x-deadline-ms": "tomorrow"}, None),
        ({"x-deadline-ms": True}, None),  # a bool is an int to Python, not a time to us
        ({"x-deadline-ms": [1, 2]}, None),
        ({"x-deadline-ms": None}, None),
        ({}, None),
        (None, None),
    ],
)
def test_timestamp_headers_of_the_wrong_type_are_ignored(
    headers: dict[str, Any] | None, expected: float | None
) -> None:
    assert header_ms(headers, "x-deadline-ms") == expected


@pytest.mark.parametrize(
    ("deadline_ms", "now_ms", "expired"),
    [(None, 5.0, False), (10.0, 5.0, False), (10.0, 10.0, False), (10.0, 10.5, True)],
)
def test_a_request_expires_only_once_its_deadline_has_passed(
    deadline_ms: float | None, now_ms: float, expired: bool
) -> None:
    assert is_expired(deadline_ms, now_ms) is expired
