"""The KEDA resources are valid against KEDA's own CRD schemas and follow the rabbitmq scaler's rules.

The CRDs are KEDA's (read from KEDA_CRDS_DIR). The API server prunes unknown fields of a custom resource
silently, so a typo there would go unnoticed in a cluster; here every object schema is closed, so an unknown
field fails the test instead.
"""

from __future__ import annotations

import copy
import functools
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from tests.chart.helpers import CHART_DIR, Helm, Rendered, Scenario, keda_crds_dir, render, scenario_params

# From KEDA's rabbitmq scaler (pkg/scalers/rabbitmq_scaler.go, KEDA v2.20.2), summarized in the CRD folder's README.
RABBITMQ_METADATA_KEYS = frozenset(
    {
        "queueName", "mode", "value", "activationValue", "host", "hostFromEnv", "protocol", "vhostName",
        "useRegex", "excludeUnacknowledged", "pageSize", "operation", "timeout", "unsafeSsl", "usernameFromEnv",
        "passwordFromEnv", "queueLength",
    }
)  # fmt: skip
RABBITMQ_AUTH_PARAMETERS = frozenset(
    {"host", "protocol", "vhostName", "username", "password", "ca", "cert", "key", "keyPassword", "tls",
     "workloadIdentityResource"}
)  # fmt: skip
RABBITMQ_MODES = frozenset(
    {"QueueLength", "MessageRate", "DeliverGetRate", "PublishedToDeliveredRatio", "ExpectedQueueConsumptionTime"}
)
RABBITMQ_PROTOCOLS = frozenset({"amqp", "http", "auto"})


def close_object_schemas(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema where every object with declared properties rejects other properties."""
    if isinstance(schema, list):
        return [close_object_schemas(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: close_object_schemas(value) for key, value in schema.items()}
    if (
        "properties" in closed
        and "additionalProperties" not in closed
        and not closed.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    return closed


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """(apiVersion, kind) -> a validator for that custom resource, from every CRD in KEDA_CRDS_DIR."""
    validators = {}
    for path in sorted(keda_crds_dir().glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schema = close_object_schemas(version["schema"]["openAPIV3Schema"])
                validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def crd_errors(doc: dict[str, Any]) -> list[str]:
    validator = crd_validators().get((doc["apiVersion"], doc["kind"]))
    if validator is None:
        return [f"no served KEDA CRD for {doc['apiVersion']} {doc['kind']}"]
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def rabbitmq_trigger_problems(trigger: dict[str, Any], auth_parameters: set[str]) -> list[str]:
    """What KEDA's rabbitmq scaler would refuse or silently misread in one trigger, plus the chart's own rules."""
    metadata: dict[str, str] = trigger["metadata"]
    problems = [f"unknown metadata key {key}" for key in sorted(set(metadata) - RABBITMQ_METADATA_KEYS)]
    problems += [f"unknown auth parameter {key}" for key in sorted(auth_parameters - RABBITMQ_AUTH_PARAMETERS)]
    problems += [
        f"{key} set in both metadata and TriggerAuthentication" for key in sorted(set(metadata) & auth_parameters)
    ]
    if "queueLength" in metadata:
        problems.append("queueLength is deprecated (and may not be combined with mode/value): use mode and value")
    mode = metadata.get("mode", "QueueLength")
    protocol = metadata.get("protocol", "auto")
    if mode not in RABBITMQ_MODES:
        problems.append(f"mode {mode} is not one of {sorted(RABBITMQ_MODES)}")
    if protocol not in RABBITMQ_PROTOCOLS:
        problems.append(f"protocol {protocol} is not one of {sorted(RABBITMQ_PROTOCOLS)}")
    if mode != "QueueLength" and protocol != "http":
        problems.append(f"mode {mode} needs protocol http")
    if "excludeUnacknowledged" in metadata and protocol != "http":
        problems.append("excludeUnacknowledged is only valid with protocol http")
    for key in ("value", "activationValue"):
        if key in metadata:
            try:
                number = float(metadata[key])
            except ValueError:
                problems.append(f"{key} {metadata[key]!r} is not a number")
                continue
            if number < 0 or (key == "value" and number == 0):
                problems.append(f"{key} {number} is out of range")
    if "value" not in metadata:
        problems.append("value (the target per replica) is missing")
    if not metadata.get("queueName"):
        problems.append("queueName is missing")
    host = metadata.get("host", "")
    if host and urlsplit(host).username is not None:
        problems.append("the trigger's host carries credentials")
    if host and protocol == "http" and urlsplit(host).scheme not in ("http", "https"):
        problems.append(f"protocol http needs an http(s) host, got {host}")
    if not host and "host" not in auth_parameters and "hostFromEnv" not in metadata:
        problems.append("no host: neither in metadata nor in the TriggerAuthentication")
    if ("username" in auth_parameters) != ("password" in auth_parameters):
        problems.append("username and password must come together")
    if host and urlsplit(host).scheme == "amqps" and "tls" not in auth_parameters:
        problems.append("an amqps:// host needs the tls parameter (enable) in the TriggerAuthentication")
    if ("cert" in auth_parameters) != ("key" in auth_parameters):
        problems.append("cert and key must come together")
    return problems


def auth_parameters(rendered: Rendered, trigger: dict[str, Any]) -> set[str]:
    name = trigger["authenticationRef"]["name"]
    (auth,) = (doc for doc in rendered.of_kind("TriggerAuthentication") if doc["metadata"]["name"] == name)
    refs = auth["spec"].get("secretTargetRef", []) + auth["spec"].get("configMapTargetRef", [])
    return {ref["parameter"] for ref in refs}


def autoscaling_scenarios() -> list[Any]:
    return [
        param
        for param in scenario_params()
        if Helm.load_chart().merge_values(param.values[0].values())["autoscaling"]["enabled"]
    ]


@pytest.mark.parametrize("scenario", autoscaling_scenarios())
def test_keda_resources_match_the_keda_crd_schemas(scenario: Scenario) -> None:
    rendered = render(scenario.values())
    kinds = sorted(doc["kind"] for doc in rendered.keda())
    assert kinds == ["ScaledObject", "TriggerAuthentication"]
    for doc in rendered.keda():
        assert crd_errors(doc) == [], f"{doc['kind']} {doc['metadata']['name']}"


@pytest.mark.parametrize("scenario", autoscaling_scenarios())
def test_rabbitmq_triggers_follow_the_scaler_rules(scenario: Scenario) -> None:
    rendered = render(scenario.values())
    triggers = rendered.one("ScaledObject")["spec"]["triggers"]
    assert triggers
    for trigger in triggers:
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert rabbitmq_trigger_problems(trigger, auth_parameters(rendered, trigger)) == []


@pytest.mark.parametrize("scenario", autoscaling_scenarios())
def test_keda_reads_its_credentials_from_the_workers_secret(scenario: Scenario) -> None:
    rendered = render(scenario.values())
    values = Helm.load_chart().merge_values(scenario.values())
    secret_name = rendered.secret_files()["AMQP_URL_FILE"].removeprefix("secret:").split("/")[0]
    auth = rendered.one("TriggerAuthentication")
    refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"] if ref["name"] == secret_name}
    assert set(refs) == {"username", "password"}
    keys = values["broker"]["secretKeys"]
    assert (refs["username"]["key"], refs["password"]["key"]) == (keys["kedaUsername"], keys["kedaPassword"])
    for secret in rendered.of_kind("Secret"):
        assert {keys["kedaUsername"], keys["kedaPassword"]} <= set(secret["data"])


def test_by_default_keda_counts_unacknowledged_messages_over_the_management_api() -> None:
    rendered = render(Scenario("defaults", None).values())
    (trigger,) = rendered.one("ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["protocol"] == "http"
    assert "excludeUnacknowledged" not in trigger["metadata"]


def test_scale_to_zero_scenario_lets_keda_remove_every_replica() -> None:
    spec = render(Scenario("scale-to-zero", CHART_DIR / "ci" / "scale-to-zero-values.yaml").values()).one(
        "ScaledObject"
    )["spec"]
    assert spec["minReplicaCount"] == 0
    assert spec["cooldownPeriod"] > 0
    scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] > 0


def test_the_crd_check_rejects_an_unknown_field() -> None:
    scaled_object = copy.deepcopy(render(Scenario("defaults", None).values()).one("ScaledObject"))
    scaled_object["spec"]["minReplicas"] = 0
    assert any("minReplicas" in error for error in crd_errors(scaled_object))


def test_the_trigger_rules_reject_what_keda_would_refuse() -> None:
    trigger = {
        "type": "rabbitmq",
        "metadata": {
            "host": "amqp://user:password@rabbitmq:5672/",
            "protocol": "amqp",
            "mode": "MessageRate",
            "queueName": "inference",
            "value": "many",
            "excludeUnacknowledged": "true",
            "queueLenght": "5",
        },
    }
    problems = rabbitmq_trigger_problems(trigger, {"host", "username"})
    assert problems == [
        "unknown metadata key queueLenght",
        "host set in both metadata and TriggerAuthentication",
        "mode MessageRate needs protocol http",
        "excludeUnacknowledged is only valid with protocol http",
        "value 'many' is not a number",
        "the trigger's host carries credentials",
        "username and password must come together",
    ]


def test_the_trigger_rules_reject_tls_that_keda_would_not_use() -> None:
    trigger = {
        "type": "rabbitmq",
        "metadata": {"host": "amqps://rabbitmq:5671/", "protocol": "amqp", "queueName": "inference", "value": "10"},
    }
    assert rabbitmq_trigger_problems(trigger, {"username", "password", "ca", "cert"}) == [
        "an amqps:// host needs the tls parameter (enable) in the TriggerAuthentication",
        "cert and key must come together",
    ]
