"""Shared fixtures: a real RabbitMQ broker and unique queue names.

Broker order: ``AMQP_URL`` when set; else a testcontainers RabbitMQ when Docker answers; else the
integration tests skip with the reason, except under ``CI=true``, where a missing broker fails.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import aio_pika
import pytest

from producer.wire.names import dead_letter_queue

if TYPE_CHECKING:
    from tests.support.tls_broker import TlsBroker


def _answers(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5672), timeout=2):
            return True
    except OSError:
        return False


def _docker_answers() -> bool:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://") and not os.path.exists(host.removeprefix("unix://")):
        return False
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=3)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """URL of a reachable RabbitMQ broker for this test session."""
    url = os.environ.get("AMQP_URL")
    if url:
        if not _answers(url):
            pytest.fail(f"AMQP_URL={url} is set but nothing answers there; start the broker (`make broker`)")
        yield url
        return
    if _docker_answers():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-management") as container:
            # Model routes need the consistent-hash exchange (scripts/ensure-broker.sh does the same).
            container.exec(["rabbitmq-plugins", "enable", "rabbitmq_consistent_hash_exchange"])
            params = container.get_connection_params()
            yield f"amqp://guest:guest@{params.host}:{params.port}/"
        return
    reason = (
        "no broker: set AMQP_URL (e.g. `make broker` and AMQP_URL=amqp://guest:guest@127.0.0.1:5672/) or run Docker"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def queue_name(request: pytest.FixtureRequest) -> str:
    """A queue name unique to this test."""
    return f"test.{request.node.name[:40]}.{uuid.uuid4().hex[:8]}"


@pytest.fixture
def queue(queue_name: str, cleanup_queues: list[str]) -> str:
    """A request queue name unique to this test; the queue and its dead-letter queue go afterwards."""
    cleanup_queues.extend([dead_letter_queue(queue_name), queue_name])
    return queue_name


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """An aio-pika connection for the test's own publishing and inspection."""
    conn = await aio_pika.connect(amqp_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def cleanup_queues(connection: aio_pika.abc.AbstractConnection) -> AsyncIterator[list[str]]:
    """Append queue names to delete them (in reverse order) after the test."""
    names: list[str] = []
    yield names
    channel = await connection.channel()
    for name in reversed(names):
        try:
            await channel.queue_delete(name, if_unused=False, if_empty=False)
        except Exception:
            channel = await connection.channel()


@pytest.fixture(scope="session")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """A second, TLS-only RabbitMQ node requiring client certificates, with them (see tests/support/tls_broker.py).

    Skips when ``rabbitmq-server`` is not installed, except under ``CI=true``, where that fails.
    """
    from tests.support.tls_broker import TlsBroker, make_pki, rabbitmq_bin

    if rabbitmq_bin("rabbitmq-server") is None:
        reason = "no rabbitmq-server here: the TLS tests start a node of their own (apt-get install rabbitmq-server)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("tls-broker")
    broker = TlsBroker(folder / "node", make_pki(folder / "pki"))
    with broker:
        yield broker
