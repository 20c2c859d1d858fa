"""Broker URLs are shown without credentials, and connection failures say what to do."""

from __future__ import annotations

import aiormq.exceptions
import pytest

from producer.amqp.urls import connect_failure, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp://***@127.0.0.1:5672/"),
        ("amqp://user:p@ss@word@broker:5672/vhost", "amqp://***@broker:5672/vhost"),
        ("amqps://u:secret@broker/", "amqps://***@broker/"),
        ("amqp://broker:5672/", "amqp://broker:5672/"),
    ],
)
def test_credentials_never_show_even_with_at_signs_in_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "ss@word" not in redact_url(url)


def test_rejected_credentials_are_reported_as_such_without_the_password() -> None:
    error = aiormq.exceptions.ProbableAuthenticationError("ACCESS_REFUSED")
    text = connect_failure("amqp://alice:s3cr@t@broker:5672/", error)
    assert "refused the credentials of user 'alice'" in text
    assert "s3cr" not in text


def test_an_unreachable_broker_is_reported_as_unreachable() -> None:
    text = connect_failure("amqp://a:b@broker:5672/", ConnectionRefusedError("refused"))
    assert text.startswith("no RabbitMQ answered at amqp://***@broker:5672/")
