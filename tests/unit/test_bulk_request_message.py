"""Request messages: the properties and headers every producer (RPC client and bulk jobs) sets."""

from __future__ import annotations

import aio_pika
import pytest

from producer.amqp.messages import now_ms, request_message
from producer.wire.names import CONTENT_TYPE_MSGPACK, DIRECT_REPLY_TO, HEADER_DEADLINE_MS, HEADER_PUBLISHED_MS


def test_timeout_becomes_expiration_and_an_absolute_deadline() -> None:
    before = now_ms()
    message = request_message(
        b"body", request_id="r1", content_type=CONTENT_TYPE_MSGPACK, reply_to=DIRECT_REPLY_TO, timeout_s=0.2
    )
    after = now_ms()
    props = message.properties
    assert props.expiration == "200"
    assert (props.correlation_id, props.reply_to, props.content_type) == ("r1", DIRECT_REPLY_TO, CONTENT_TYPE_MSGPACK)
    headers = props.headers or {}
    published, deadline = headers[HEADER_PUBLISHED_MS], headers[HEADER_DEADLINE_MS]
    assert isinstance(published, int)
    assert before <= published <= after
    assert deadline == published + 200
    assert message.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT


def test_bulk_requests_are_persistent_and_have_no_deadline() -> None:
    message = request_message(
        b"b", request_id="r", content_type=CONTENT_TYPE_MSGPACK, reply_to="results.j", persistent=True
    )
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.properties.expiration is None
    assert HEADER_DEADLINE_MS not in (message.properties.headers or {})


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        request_message(b"b", request_id="r", content_type=CONTENT_TYPE_MSGPACK, reply_to="q", timeout_s=0)
