"""Model routes without a broker: names, the worker's routed settings, the client's targets."""

from __future__ import annotations

import pytest

from producer import Client
from producer.amqp.routes import VersionState, management_url_for, shares
from producer.wire.names import model_exchange, version_of_queue, version_queue
from worker.settings import Settings, SettingsError


def test_route_names_derive_from_the_model_and_the_version() -> None:
    assert model_exchange("minilm") == "model.minilm"
    assert version_queue("minilm", "2") == "model.minilm.v2"
    assert version_of_queue("minilm", "model.minilm.v2-int8") == "2-int8"
    assert version_of_queue("minilm", "model.minilm.v2.dead") is None, "a dead-letter queue is no version"
    assert version_of_queue("minilm", "model.other.v2") is None


@pytest.mark.parametrize(("model", "version"), [("mini.lm", "1"), ("minilm", "2.1"), ("", "1"), ("minilm", "")])
def test_names_that_would_break_route_names_are_refused(model: str, version: str) -> None:
    with pytest.raises(ValueError, match="cannot name a route"):
        version_queue(model, version)


def test_a_weight_makes_the_worker_consume_its_version_queue() -> None:
    settings = Settings.from_env({}, model_name="minilm", model_version="2", traffic_weight=10, queue="inference")
    assert (settings.routed, settings.queue) == (True, "model.minilm.v2")
    assert not Settings().routed
    assert Settings.from_env({"WORKER_TRAFFIC_WEIGHT": ""}).traffic_weight is None
    assert Settings.from_env({"WORKER_TRAFFIC_WEIGHT": "0", "WORKER_MODEL_NAME": "m"}).traffic_weight == 0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORKER_TRAFFIC_WEIGHT": "5"}, "needs WORKER_MODEL_NAME"),
        ({"WORKER_TRAFFIC_WEIGHT": "101", "WORKER_MODEL_NAME": "m"}, "between 0 and 100"),
        ({"WORKER_TRAFFIC_WEIGHT": "-1", "WORKER_MODEL_NAME": "m"}, "between 0 and 100"),
        ({"WORKER_TRAFFIC_WEIGHT": "half", "WORKER_MODEL_NAME": "m"}, "not an int"),
        ({"WORKER_TRAFFIC_WEIGHT": "5", "WORKER_MODEL_NAME": "m", "WORKER_MODEL_VERSION": "1.2"}, "no dots"),
    ],
)
def test_bad_route_settings_fail_at_start_naming_the_option(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_a_client_pin_needs_a_model() -> None:
    with pytest.raises(ValueError, match="pass model= too"):
        Client(version="2")
    with pytest.raises(ValueError, match="cannot name a route"):
        Client(model="mini.lm")


def test_shares_are_weights_over_their_sum() -> None:
    states = [VersionState("1", 90, 0, 1), VersionState("2", 10, 0, 1), VersionState("3", 0, 5, 0)]
    assert shares(states) == {"1": 0.9, "2": 0.1, "3": 0.0}
    assert shares([VersionState("1", 0, 0, 0)]) == {"1": 0.0}


def test_the_management_api_defaults_to_the_brokers_host_and_credentials() -> None:
    assert management_url_for("amqp://u:p@rabbit:5672/vh") == "http://u:p@rabbit:15672/"
    assert management_url_for("amqps://u:p@rabbit/") == "https://u:p@rabbit:15672/"
