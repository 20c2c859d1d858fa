"""The chart and the worker agree: settings, queue, drain timeout; the values schema catches mistakes."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import pytest
import yaml

from scripts import chart_readme
from tests.chart.helpers import (
    CHART_DIR,
    INSTALL_TIME_CREDENTIALS,
    REPO_ROOT,
    Helm,
    Scenario,
    deep_merge,
    render,
    scenario_params,
    values_files,
)
from worker.settings import ENV_VARS, SETTINGS, Settings

# Worker settings a Deployment does not set through the ConfigMap, and why.
NOT_IN_CONFIGMAP = {
    "AMQP_URL": "holds credentials: the worker reads it from the Secret, mounted as a file (AMQP_URL_FILE)",
    "WORKER_EXIT_WHEN_IDLE": "for batch runs and tests: a Deployment's worker must not exit when the queue drains",
    "AMQP_TLS_VERIFY_HOSTNAME": "for test rigs only: a Deployment always checks the broker's host name",
}
# Worker settings the chart sets to files of a read-only Secret mount, not from a worker.* key.
MOUNTED_FILES = {
    "AMQP_URL_FILE": "the broker Secret's URL key, always",
    "AMQP_CA_FILE": "the TLS Secret's CA key, with broker.tls.enabled",
    "AMQP_CERT_FILE": "the TLS Secret's certificate key, with broker.tls.enabled and a certificate key",
    "AMQP_KEY_FILE": "the TLS Secret's private key, with broker.tls.enabled and a certificate key",
}
NO_WORKER_KEY = NOT_IN_CONFIGMAP | MOUNTED_FILES
# Worker settings whose chart key is not worker.<camelCase field>.
CHART_KEYS = {"model": ("model", "path")}
# Where the chart's default deliberately differs from the worker's, and why.
DELIBERATE_DEFAULTS = {
    "model": "the image's absolute model path",
    "device": "cuda, so a GPU pod without a usable GPU fails loudly instead of running on CPU",
    "log_format": "json, for log collectors (no TTY in a pod anyway)",
}


def camel(field: str) -> str:
    head, *rest = field.split("_")
    return head + "".join(part.capitalize() if part != "s" else "S" for part in rest)


def chart_key(field: str) -> tuple[str, ...]:
    return CHART_KEYS.get(field, ("worker", camel(field)))


def dig(values: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        values = values[key]
    return values


def chart_defaults() -> dict[str, Any]:
    return Helm.load_chart().values


@pytest.mark.parametrize("scenario", scenario_params())
def test_every_variable_the_deployment_sets_is_a_worker_setting(scenario: Scenario) -> None:
    rendered = render(scenario.values())
    env = {k: v for k, v in rendered.worker_env().items() if not k.startswith("OTEL_")}
    assert set(env) <= ENV_VARS, f"not worker settings: {sorted(set(env) - ENV_VARS)}"
    assert set(env) >= ENV_VARS - set(NO_WORKER_KEY) | {"AMQP_URL_FILE"}
    assert not set(env) & set(NOT_IN_CONFIGMAP)
    assert rendered.secret_files()["AMQP_URL_FILE"].startswith("secret:"), "the URL must come from a Secret"
    container = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert all("valueFrom" not in entry for entry in container.get("env", [])), "no Secret in an environment variable"


@pytest.mark.parametrize("scenario", scenario_params())
def test_the_worker_accepts_the_settings_the_chart_renders(scenario: Scenario, tmp_path: Path) -> None:
    rendered = render(scenario.values())
    env = rendered.worker_env()
    tls = "AMQP_CA_FILE" in env
    for name in MOUNTED_FILES.keys() & env.keys():  # what the mounted Secrets would hold
        env[name] = str(tmp_path / name)
        content = "amqps://user:password@rabbitmq:5671/" if tls else "amqp://user:password@rabbitmq:5672/"
        (tmp_path / name).write_text(content if name == "AMQP_URL_FILE" else "PEM")
    settings = Settings.from_env(env)
    assert settings.amqp_url.startswith("amqps://" if tls else "amqp://")
    values = Helm.load_chart().merge_values(scenario.values())
    for spec in SETTINGS:
        if spec.env in NO_WORKER_KEY or (spec.field == "queue" and settings.routed):
            continue  # a routed worker consumes its version's queue (see the trigger test)
        expected = spec.parse(str(dig(values, chart_key(spec.field))))
        assert getattr(settings, spec.field) == expected, spec.env


@pytest.mark.parametrize("scenario", scenario_params())
def test_the_trigger_watches_the_queue_the_worker_consumes(scenario: Scenario) -> None:
    rendered = render(scenario.values())
    env = {k: v for k, v in rendered.worker_env().items() if k not in MOUNTED_FILES}  # files exist in the pod only
    env["AMQP_URL"] = "amqp://user:password@rabbitmq:5672/"
    queue = Settings.from_env(env).queue  # a version's queue when the release serves a model version
    for scaled_object in rendered.of_kind("ScaledObject"):
        assert [t["metadata"]["queueName"] for t in scaled_object["spec"]["triggers"]] == [queue]


@pytest.mark.parametrize("scenario", scenario_params())
def test_grace_period_covers_the_drain_timeout(scenario: Scenario) -> None:
    rendered = render(scenario.values())
    grace_s = rendered.one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s > float(rendered.worker_env()["WORKER_DRAIN_TIMEOUT_S"])


def test_a_grace_period_shorter_than_the_drain_timeout_is_refused() -> None:
    values = deep_merge(
        INSTALL_TIME_CREDENTIALS, {"worker": {"drainTimeoutS": 60}, "terminationGracePeriodSeconds": 65}
    )
    with pytest.raises(helm.HelmError, match=r"terminationGracePeriodSeconds \(65\) must be at least"):
        render(values)
    values["terminationGracePeriodSeconds"] = 70
    assert render(values).one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 70


def test_a_target_at_or_below_prefetch_is_refused_over_the_management_api() -> None:
    values = deep_merge(
        INSTALL_TIME_CREDENTIALS, {"worker": {"prefetch": 512}, "autoscaling": {"targetQueueLength": 512}}
    )
    with pytest.raises(helm.HelmError, match=r"targetQueueLength \(512\) must exceed worker.prefetch"):
        render(values)


def test_a_target_at_or_below_what_one_pod_of_several_processes_holds_is_refused() -> None:
    values = deep_merge(
        INSTALL_TIME_CREDENTIALS,
        {"worker": {"prefetch": 256, "processes": 4}, "autoscaling": {"targetQueueLength": 1024}},
    )
    with pytest.raises(helm.HelmError, match=r"must exceed worker.prefetch x worker.processes \(256 x 4 = 1024\)"):
        render(values)
    values["autoscaling"]["targetQueueLength"] = 1025
    assert render(values).worker_env()["WORKER_PROCESSES"] == "4"
    values["worker"]["processes"] = "auto"
    assert render(values).worker_env()["WORKER_PROCESSES"] == "auto"


def test_every_worker_setting_has_one_chart_key() -> None:
    exposed = {camel(spec.field) for spec in SETTINGS if spec.env not in NO_WORKER_KEY and spec.field not in CHART_KEYS}
    assert set(chart_defaults()["worker"]) == exposed


def test_chart_defaults_are_the_worker_defaults_unless_deliberate() -> None:
    for spec in SETTINGS:
        if spec.env in NO_WORKER_KEY or spec.field in DELIBERATE_DEFAULTS:
            continue
        chart_value = spec.parse(str(dig(chart_defaults(), chart_key(spec.field))))
        assert chart_value == spec.default, f"{spec.env}: chart {chart_value!r}, worker {spec.default!r}"


def worker_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART_DIR / "values.schema.json").read_text())
    return schema


def test_schema_ranges_and_choices_are_the_workers() -> None:
    properties = worker_schema()["properties"]["worker"]["properties"]
    for spec in SETTINGS:
        if spec.env in NO_WORKER_KEY or spec.field in CHART_KEYS:
            continue
        declared = properties[camel(spec.field)]
        if spec.field == "traffic_weight":  # a number in range, or empty for "not set"
            declared = next(option for option in declared["oneOf"] if option["type"] == "integer")
        if spec.choices is not None:
            assert declared["enum"] == list(spec.choices), spec.env
        if spec.field == "http_port":
            # The worker accepts 0 (no HTTP server); the chart needs the server for its probes.
            assert (declared["minimum"], declared["maximum"]) == (1, spec.maximum)
        elif spec.minimum is not None:
            assert (declared["minimum"], declared["maximum"]) == (spec.minimum, spec.maximum), spec.env


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        pytest.param({"worker": {"prefech": 128}}, "prefech", id="typo-in-worker"),
        pytest.param({"autoscaling": {"minReplica": 0}}, "minReplica", id="typo-in-autoscaling"),
        pytest.param({"replicas": 3}, "replicas", id="unknown-top-level-key"),
        pytest.param({"worker": {"device": "tpu"}}, "device", id="device-not-a-choice"),
        pytest.param({"worker": {"prefetch": 0}}, "prefetch", id="prefetch-below-range"),
        pytest.param({"worker": {"httpPort": 0}}, "httpPort", id="no-http-server"),
        pytest.param({"autoscaling": {"minReplicas": -1}}, "minReplicas", id="negative-replicas"),
        pytest.param({"autoscaling": {"protocol": "https"}}, "protocol", id="protocol-not-a-choice"),
        pytest.param({"autoscaling": {"host": "http://guest:guest@rabbitmq:15672/"}}, "host", id="credentials-in-host"),
        pytest.param({"worker": {"maxBatch": "64"}}, "maxBatch", id="number-as-string"),
        pytest.param({"worker": {"processes": "many"}}, "processes", id="processes-neither-number-nor-auto"),
        pytest.param({"worker": {"trafficWeight": 101}}, "trafficWeight", id="weight-above-range"),
        pytest.param({"worker": {"trafficWeight": "5"}}, "trafficWeight", id="weight-as-string"),
    ],
)
def test_the_values_schema_rejects_mistakes(override: dict[str, Any], complaint: str) -> None:
    chart = Helm.load_chart()
    with pytest.raises(helm.HelmValuesError, match=complaint):
        chart.validate_schema(chart.merge_values(deep_merge(INSTALL_TIME_CREDENTIALS, override)))


@pytest.mark.parametrize("path", values_files(), ids=lambda p: str(p.relative_to(CHART_DIR)))
def test_values_files_hold_no_credentials(path: Any) -> None:
    text = path.read_text()
    values = yaml.safe_load(text) or {}
    for key, value in values.get("broker", {}).get("auth", {}).items():
        assert not value, f"broker.auth.{key} is set in {path.name}: pass credentials at install time"
    for url in strings(values):
        if "://" in url:
            assert urlsplit(url).password is None, f"{path.name} has a URL with credentials"


def strings(node: Any) -> list[str]:
    """Every string value in a parsed YAML document (comments are documentation, not values)."""
    if isinstance(node, dict):
        return [text for value in node.values() for text in strings(value)]
    if isinstance(node, list):
        return [text for value in node for text in strings(value)]
    return [node] if isinstance(node, str) else []


@pytest.mark.parametrize("path", values_files(), ids=lambda p: str(p.relative_to(CHART_DIR)))
def test_values_files_pass_the_schema(path: Any) -> None:
    chart = Helm.load_chart()
    chart.validate_schema(chart.merge_values(yaml.safe_load(path.read_text()) or {}))


def test_every_values_key_has_a_helm_docs_comment() -> None:
    comments = chart_readme.read_comments((CHART_DIR / "values.yaml").read_text())  # the README's own reading
    keys, documented = set(comments.order), set(comments.docs)
    parents = {path[:i] for path in keys for i in range(1, len(path))}
    undocumented = [
        ".".join(path)
        for path in sorted(keys)
        if not any(path[:i] in documented for i in range(1, len(path) + 1)) and path not in parents
    ]
    assert not undocumented, f"keys without a `# --` comment: {undocumented}"


def test_values_files_point_editors_at_the_schema() -> None:
    for path in [CHART_DIR / "values.yaml", *sorted(CHART_DIR.glob("values-*.yaml"))]:
        assert path.read_text().splitlines()[0] == "# yaml-language-server: $schema=values.schema.json", path.name


def test_schema_is_draft_07_and_closed_wherever_a_typo_could_hide() -> None:
    schema = worker_schema()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"

    def walk(node: dict[str, Any], where: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{where} accepts unknown keys"
            for name, child in node["properties"].items():
                assert "description" in child, f"{where}.{name} has no description"
                walk(child, f"{where}.{name}")

    walk(schema, "values")


def test_chart_app_version_is_the_projects_version() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["appVersion"] == project["version"]


def test_a_canary_release_consumes_its_version_queue_and_binds_its_weight() -> None:
    values = deep_merge(
        INSTALL_TIME_CREDENTIALS, {"worker": {"modelName": "minilm", "modelVersion": "2", "trafficWeight": 5}}
    )
    rendered = render(values)
    env = rendered.worker_env()
    assert env["WORKER_TRAFFIC_WEIGHT"] == "5"
    assert [t["metadata"]["queueName"] for t in rendered.one("ScaledObject")["spec"]["triggers"]] == ["model.minilm.v2"]


def test_a_weight_without_a_route_name_is_refused() -> None:
    values = deep_merge(INSTALL_TIME_CREDENTIALS, {"worker": {"modelName": "", "trafficWeight": 5}})
    with pytest.raises(helm.HelmError, match=r"worker.modelName names the model's route"):
        render(values)
    values = deep_merge(INSTALL_TIME_CREDENTIALS, {"worker": {"modelName": "minilm", "modelVersion": "2.1"}})
    values["worker"]["trafficWeight"] = 0
    with pytest.raises(helm.HelmError, match=r"worker.modelVersion names the version's queue"):
        render(values)
