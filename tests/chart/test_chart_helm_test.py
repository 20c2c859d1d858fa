"""The ``helm test`` hook: a valid, restricted Pod that sends the producer's real command to the release's queue.

The hook Pod runs files/helm_test.py, which runs ``python -m producer.cli send``: its options are parsed here by
the producer's own parser, so a renamed or removed option fails this test instead of every ``helm test``. The
script's verdicts against a real broker and worker are in tests/integration/test_helm_test_hook.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from producer.amqp import tls, urls
from producer.cli import build_parser as producer_parser
from tests.chart.helpers import (
    HELM_TEST_SCRIPT,
    INSTALL_TIME_CREDENTIALS,
    Helm,
    Rendered,
    Scenario,
    assert_restricted_pod,
    deep_merge,
    hook_pod,
    load_helm_test_script,
    render,
    scenario_params,
    worker_container,
)
from tests.chart.test_chart_render import kube_versions
from worker.settings import Settings


def rendered_hook(scenario: Scenario) -> tuple[Rendered, dict[str, Any]]:
    rendered = render(scenario.values())
    pod = hook_pod(rendered)
    assert pod is not None, "tests.enabled renders the helm test Pod"
    return rendered, pod


def script_args(pod: dict[str, Any]) -> Any:
    """The options the Pod passes the script, parsed by the script's own parser."""
    (container,) = pod["spec"]["containers"]
    python, flag, source, *args = container["command"]
    assert (python, flag) == ("python", "-c")
    assert source == HELM_TEST_SCRIPT.read_text(), "the Pod runs files/helm_test.py"
    return load_helm_test_script().build_parser().parse_args(args)


def worker_settings(rendered: Rendered, tmp_path: Path) -> Settings:
    """The worker's settings as its pods would load them (Secret files replaced by local ones)."""
    env = rendered.worker_env()
    for name in ("AMQP_URL_FILE", "AMQP_CA_FILE", "AMQP_CERT_FILE", "AMQP_KEY_FILE"):
        if name in env:
            env[name] = str(tmp_path / name)
            scheme = "amqps" if "AMQP_CA_FILE" in env else "amqp"
            (tmp_path / name).write_text(f"{scheme}://u:p@rabbitmq/" if name == "AMQP_URL_FILE" else "PEM")
    return Settings.from_env(env)


def replied_model_name(settings: Settings) -> str:
    """The model name the workers' replies carry: WORKER_MODEL_NAME, else the model file's stem (folder: its name)."""
    if settings.model_name:
        return settings.model_name
    return settings.model.name if settings.model.suffix != ".onnx" else settings.model.stem


@pytest.mark.parametrize("scenario", scenario_params())
def test_the_hook_is_a_valid_test_pod_and_policy_in_strict_mode(scenario: Scenario) -> None:
    rendered, pod = rendered_hook(scenario)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    hooks = [pod, *(p for p in rendered.of_kind("NetworkPolicy") if p["metadata"]["name"] == pod["metadata"]["name"])]
    for doc in hooks:
        assert doc["metadata"]["annotations"]["helm.sh/hook"] == "test"
        for kube_version in kube_versions():
            try:
                kubernetes_validate.validate(doc, kube_version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {kube_version}): {e.message}")


@pytest.mark.parametrize("scenario", scenario_params())
def test_the_hook_pod_is_as_restricted_as_the_workers(scenario: Scenario) -> None:
    rendered, pod = rendered_hook(scenario)
    assert_restricted_pod(pod["spec"])
    worker_pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    assert pod["spec"]["securityContext"] == worker_pod["securityContext"]
    assert (
        pod["spec"]["containers"][0]["securityContext"]
        == worker_container(rendered.one("Deployment"))["securityContext"]
    )
    assert "nvidia.com/gpu" not in pod["spec"]["containers"][0]["resources"].get("limits", {})


@pytest.mark.parametrize("scenario", scenario_params())
def test_the_hook_reads_the_broker_url_and_tls_files_as_the_workers_do(scenario: Scenario) -> None:
    rendered, pod = rendered_hook(scenario)
    (container,) = pod["spec"]["containers"]
    env = {entry["name"]: entry["value"] for entry in container["env"]}
    worker_files = {k: v for k, v in rendered.worker_env().items() if k.startswith("AMQP_")}
    assert env == worker_files
    # The names the producer reads, so the client finds the files without a flag.
    assert set(env) <= {urls.ENV_URL_FILE, tls.ENV_CA_FILE, tls.ENV_CERT_FILE, tls.ENV_KEY_FILE}
    worker = worker_container(rendered.one("Deployment"))
    worker_volumes = {v["name"]: v for v in rendered.one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        assert mount in worker["volumeMounts"], f"{mount['mountPath']} is not mounted in the worker"
        (volume,) = (v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume == worker_volumes[mount["name"]]
        assert "secret" in volume
        assert mount["readOnly"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} == {
        m["mountPath"] for m in worker["volumeMounts"] if m["name"].startswith("broker")
    }


@pytest.mark.parametrize("scenario", scenario_params())
def test_the_hook_sends_a_real_producer_command_to_the_queue_the_workers_consume(
    scenario: Scenario, tmp_path: Path
) -> None:
    rendered, pod = rendered_hook(scenario)
    values = Helm.load_chart().merge_values(scenario.values())
    args = script_args(pod)
    script = load_helm_test_script()
    argv = script.producer_argv(args.queue, args.request, args.timeout_s)
    sent = producer_parser().parse_args(argv)
    (send,) = (a.choices["send"] for a in producer_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = [token for token in argv if token.startswith("--")]
    assert set(flags) <= set(send._option_string_actions), "every flag spelt out in full (no abbreviations)"
    settings = worker_settings(rendered, tmp_path)
    assert sent.command == "send"
    assert sent.queue == settings.queue
    assert json.loads(sent.body) == values["tests"]["request"]
    assert sent.content_type == "application/json"
    assert sent.timeout_s == values["tests"]["timeoutS"]
    assert (args.model_name, args.model_version) == (replied_model_name(settings), settings.model_version)
    assert pod["spec"]["activeDeadlineSeconds"] > args.timeout_s + script.PROCESS_MARGIN_S


def test_a_canary_release_tests_its_own_version_queue_and_a_model_file_its_stem(tmp_path: Path) -> None:
    values = deep_merge(
        INSTALL_TIME_CREDENTIALS,
        {
            "worker": {"modelName": "minilm", "modelVersion": "2", "trafficWeight": 5},
            "tests": {"timeoutS": 7.5, "request": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                                                               "data": [1, 2]}]}},
        },
    )  # fmt: skip
    args = script_args(hook_pod(render(values)))
    assert (args.queue, args.model_name, args.model_version, args.timeout_s) == ("model.minilm.v2", "minilm", "2", 7.5)
    file_model = deep_merge(INSTALL_TIME_CREDENTIALS, {"model": {"path": "/models/affine/affine.onnx"}})
    rendered = render(file_model)
    assert script_args(hook_pod(rendered)).model_name == replied_model_name(worker_settings(rendered, tmp_path))


@pytest.mark.parametrize("scenario", scenario_params())
def test_no_worker_selector_picks_up_the_hook_pod_and_its_policy_selects_only_it(scenario: Scenario) -> None:
    rendered, pod = rendered_hook(scenario)
    labels = pod["metadata"]["labels"].items()
    deployment = rendered.one("Deployment")
    selectors = [deployment["spec"]["selector"]["matchLabels"], rendered.one("Service")["spec"]["selector"]]
    selectors += [pdb["spec"]["selector"]["matchLabels"] for pdb in rendered.of_kind("PodDisruptionBudget")]
    policies = {p["metadata"]["name"]: p for p in rendered.of_kind("NetworkPolicy")}
    worker_policy = policies.pop(deployment["metadata"]["name"], None)
    if worker_policy is not None:
        selectors.append(worker_policy["spec"]["podSelector"]["matchLabels"])
    for selector in selectors:
        assert not selector.items() <= labels, f"{selector} selects the test Pod"
    values = Helm.load_chart().merge_values(scenario.values())
    if not values["networkPolicy"]["enabled"]:
        assert policies == {}
        return
    (test_policy,) = policies.values()
    assert test_policy["metadata"]["name"] == pod["metadata"]["name"]
    assert test_policy["spec"]["podSelector"]["matchLabels"].items() <= labels
    assert (
        not test_policy["spec"]["podSelector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert test_policy["spec"]["ingress"] == []
    assert worker_policy is not None
    assert test_policy["spec"]["egress"] == worker_policy["spec"]["egress"], "the broker and DNS, as the workers"


def test_tests_disabled_renders_no_hook() -> None:
    rendered = render(
        deep_merge(INSTALL_TIME_CREDENTIALS, {"tests": {"enabled": False}, "networkPolicy": {"enabled": True}})
    )
    assert hook_pod(rendered) is None
    assert [p["metadata"]["name"] for p in rendered.of_kind("NetworkPolicy")] == ["qinfer"]


@pytest.mark.parametrize(
    "tests",
    [
        pytest.param({"timeoutS": 0}, id="no-time"),
        pytest.param({"request": {"inputs": []}}, id="no-inputs"),
        pytest.param({"request": {"inputs": [{"name": "text", "datatype": "TEXT", "shape": [1], "data": ["a"]}]}},
                     id="datatype"),
        pytest.param({"request": {"input": []}}, id="typo"),
        pytest.param({"timeout": 10}, id="unknown-key"),
    ],
)  # fmt: skip
def test_the_schema_rejects_a_test_request_that_cannot_work(tests: dict[str, Any]) -> None:
    import helm_python as helm

    chart = Helm.load_chart()
    with pytest.raises(helm.HelmValuesError, match="tests"):
        chart.validate_schema(chart.merge_values(deep_merge(INSTALL_TIME_CREDENTIALS, {"tests": tests})))


EXPECTED = {"queue": "inference", "model_name": "m", "model_version": "1", "release": "r", "timeout_s": 5.0}


@pytest.mark.parametrize(
    ("stdout", "stderr", "complaint"),
    [
        ('{"id": "a", "model_name": "m", "model_version": "1", "outputs": []}', "", "has no output data"),
        ('{"id": "a", "model_name": "m", "model_version": "1"}', "", "has no output data"),
        ("not json", "", "is not a JSON object"),
        ("", "", "no output"),
        ("", "producer: cannot reach the broker at amqp://***@rabbitmq:5672/", "cannot reach the broker"),
    ],
    ids=["empty-outputs", "no-outputs", "not-json", "silent", "unreachable"],
)
def test_the_script_fails_on_replies_a_real_worker_does_not_send(stdout: str, stderr: str, complaint: str) -> None:
    script = load_helm_test_script()
    passed, line = script.judge(1 if stderr else 0, stdout, stderr, script.Expected(**EXPECTED), 1.0)
    assert not passed
    assert line.startswith("FAIL: ")
    assert complaint in line
    assert "\n" not in line
