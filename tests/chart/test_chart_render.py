"""The chart renders and lints for every scenario, and every core resource is valid Kubernetes."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.chart.helpers import (
    CHART_DIR,
    INSTALL_TIME_CREDENTIALS,
    NAMESPACE,
    Helm,
    Scenario,
    assert_restricted_pod,
    deep_merge,
    hook_pod,
    render,
    scenario_params,
    worker_container,
)

LINT_WARNING = 2


def kube_versions() -> list[str]:
    """The oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest with published schemas."""
    claimed = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["kubeVersion"]
    oldest = claimed.removeprefix(">=").split("-")[0].rsplit(".", 1)[0]
    return [oldest, kubernetes_validate.latest_version()]


@pytest.mark.parametrize("scenario", scenario_params())
def test_helm_lint_strict_passes(scenario: Scenario) -> None:
    for kube_version in kube_versions():
        report = helm.lint(
            CHART_DIR, scenario.values(), strict=True, namespace=NAMESPACE, kube_version=f"v{kube_version}.0"
        )
        problems = [m for m in report["messages"] if m["severity"] >= LINT_WARNING]
        assert not problems, problems
        assert not report["errors"], report["errors"]


@pytest.mark.parametrize("scenario", scenario_params())
def test_every_core_resource_is_valid_kubernetes_in_strict_mode(scenario: Scenario) -> None:
    rendered = render(scenario.values())
    assert rendered.core(), "nothing rendered"
    for kube_version in kube_versions():
        for doc in rendered.core():
            try:
                kubernetes_validate.validate(doc, kube_version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {kube_version}): {e.message}")


@pytest.mark.parametrize("scenario", scenario_params())
def test_pods_meet_the_restricted_pod_security_standard(scenario: Scenario) -> None:
    rendered = render(scenario.values())
    assert_restricted_pod(rendered.one("Deployment")["spec"]["template"]["spec"])
    pod = hook_pod(rendered)
    if pod is not None:
        assert_restricted_pod(pod["spec"])


@pytest.mark.parametrize("scenario", scenario_params())
def test_tmp_is_a_writable_empty_dir_on_the_read_only_root(scenario: Scenario) -> None:
    pod = render(scenario.values()).one("Deployment")["spec"]["template"]["spec"]
    mounts = {
        m["mountPath"]: m["name"] for m in worker_container({"spec": {"template": {"spec": pod}}})["volumeMounts"]
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("scenario", scenario_params())
def test_probes_hit_the_worker_health_endpoints_on_its_port(scenario: Scenario) -> None:
    rendered = render(scenario.values())
    container = worker_container(rendered.one("Deployment"))
    (port,) = container["ports"]
    assert str(port["containerPort"]) == rendered.worker_env()["WORKER_HTTP_PORT"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": port["name"]}
    assert container["startupProbe"]["httpGet"] == {"path": "/livez", "port": port["name"]}
    service = rendered.one("Service")
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert (
        service["spec"]["selector"].items()
        <= rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )


@pytest.mark.parametrize("scenario", scenario_params())
def test_gpu_is_requested_exactly_when_enabled(scenario: Scenario) -> None:
    values = Helm.load_chart().merge_values(scenario.values())
    rendered = render(scenario.values())
    limits = worker_container(rendered.one("Deployment"))["resources"].get("limits", {})
    if values["gpu"]["enabled"]:
        assert limits["nvidia.com/gpu"] == values["gpu"]["count"]
    else:
        assert "nvidia.com/gpu" not in limits
        assert rendered.worker_env()["WORKER_DEVICE"] != "cuda"


@pytest.mark.parametrize("scenario", scenario_params())
def test_keda_owns_the_replica_count_when_autoscaling(scenario: Scenario) -> None:
    values = Helm.load_chart().merge_values(scenario.values())
    rendered = render(scenario.values())
    deployment = rendered.one("Deployment")
    if values["autoscaling"]["enabled"]:
        assert "replicas" not in deployment["spec"]
        assert rendered.one("ScaledObject")["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    else:
        assert deployment["spec"]["replicas"] == values["replicaCount"]
        assert not rendered.keda()


@pytest.mark.parametrize("scenario", scenario_params())
def test_the_broker_secret_is_the_charts_own_or_the_named_one(scenario: Scenario) -> None:
    values = Helm.load_chart().merge_values(scenario.values())
    rendered = render(scenario.values())
    url_file = rendered.secret_files()["AMQP_URL_FILE"]
    existing = values["broker"]["existingSecret"]
    secrets = rendered.of_kind("Secret")
    if existing:
        assert not secrets
        assert url_file == f"secret:{existing}/{values['broker']['secretKeys']['amqpUrl']}"
    else:
        (secret,) = secrets
        assert url_file == f"secret:{secret['metadata']['name']}/{values['broker']['secretKeys']['amqpUrl']}"
        assert values["broker"]["secretKeys"]["amqpUrl"] in secret["data"]


@pytest.mark.parametrize("scenario", scenario_params())
def test_pod_disruption_budget_and_service_select_the_worker_pods(scenario: Scenario) -> None:
    rendered = render(scenario.values())
    pod_labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    for pdb in rendered.of_kind("PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for monitor in rendered.of_kind("ServiceMonitor"):
        service_labels = rendered.one("Service")["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_model_from_a_volume_is_mounted_read_only_where_the_worker_looks() -> None:
    rendered = render(Scenario("model-volume", CHART_DIR / "ci" / "model-volume-values.yaml").values())
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    (mount,) = (m for m in worker_container(rendered.one("Deployment"))["volumeMounts"] if m["name"] == "model")
    assert mount["readOnly"] is True
    assert rendered.worker_env()["WORKER_MODEL"].startswith(mount["mountPath"] + "/")
    (volume,) = (v for v in pod["volumes"] if v["name"] == "model")
    assert volume["persistentVolumeClaim"] == {"claimName": "qinfer-models", "readOnly": True}


def test_notes_say_what_was_installed_and_how_to_send_a_request() -> None:
    notes = render(Scenario("scale-to-zero", CHART_DIR / "ci" / "scale-to-zero-values.yaml").values()).notes
    assert "Deployment qinfer" in notes
    assert "ScaledObject qinfer" in notes
    assert "Scaled to zero" in notes
    assert '"producer","send"' in notes
    assert '"datatype":"BYTES"' in notes
    assert "helm test qinfer -n inference --logs" in notes


def test_defaults_without_credentials_fail_with_a_message_naming_what_to_set() -> None:
    with pytest.raises(helm.HelmError, match=r"broker\.auth\.amqpUrl is required"):
        render({})


def render_failure(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as failure:
        render(deep_merge(INSTALL_TIME_CREDENTIALS, values))
    return str(failure.value)


def test_a_model_volume_without_a_source_is_refused() -> None:
    assert "existingClaim or model.volume.source" in render_failure({"model": {"volume": {"enabled": True}}})


def test_a_model_path_outside_the_model_volume_is_refused() -> None:
    message = render_failure({"model": {"path": "/opt/model.onnx", "volume": {"enabled": True, "existingClaim": "m"}}})
    assert "must lie under model.volume.mountPath" in message


def test_cuda_without_a_gpu_is_refused() -> None:
    assert "worker.device is cuda but gpu.enabled is false" in render_failure({"gpu": {"enabled": False}})
