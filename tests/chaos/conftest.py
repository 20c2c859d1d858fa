"""Fixtures for the fault matrix: the broker (a vhost of its own when rabbitmqctl controls it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.harness import Broker


@pytest.fixture(scope="session")
def chaos_broker(amqp_url: str) -> Broker:
    return Broker.prepare(amqp_url)


@pytest.fixture(scope="session")
def chaos_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chaos")


def require_ctl(broker: Broker) -> None:
    """Skip unless rabbitmqctl controls the broker; under CI=true a local broker without it fails."""
    if broker.ctl is not None:
        return
    reason = "needs rabbitmqctl for a local broker"
    if os.environ.get("CI", "").lower() == "true" and broker.url.split("@")[-1].startswith(("127.0.0.1", "localhost")):
        pytest.fail(reason)
    pytest.skip(reason)
