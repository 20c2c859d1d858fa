"""Secrets as read-only files, TLS for the workers and for KEDA, the NetworkPolicy, no API token in the pods."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import pytest

from tests.chart.helpers import (
    INSTALL_TIME_CREDENTIALS,
    INSTALL_TIME_TLS_CREDENTIALS,
    Helm,
    Rendered,
    Scenario,
    deep_merge,
    render,
    scenario_params,
)

TLS = {"broker": {"tls": {"enabled": True, "secretName": "broker-tls"}}}
TLS_KEDA = {"autoscaling": {"host": "https://rabbitmq:15671/"}}


def merged(scenario: Scenario) -> dict[str, Any]:
    return Helm.load_chart().merge_values(scenario.values())


@pytest.mark.parametrize("scenario", scenario_params())
def test_secrets_reach_the_worker_only_as_read_only_files_holding_just_what_it_needs(scenario: Scenario) -> None:
    rendered = render(scenario.values())
    values = merged(scenario)
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    files = rendered.secret_files()  # also checks each is on a read-only Secret mount
    broker_volume = next(
        v for v in pod["volumes"] if v.get("secret", {}).get("items", [{}])[0].get("path") == "amqp-url"
    )
    assert [item["key"] for item in broker_volume["secret"]["items"]] == [values["broker"]["secretKeys"]["amqpUrl"]]
    for volume in pod["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] == 0o440
    tls = values["broker"]["tls"]
    if tls["enabled"]:
        keys = tls["secretKeys"]
        assert files["AMQP_CA_FILE"] == f"secret:{tls['secretName']}/{keys['ca']}"
        assert files["AMQP_CERT_FILE"] == f"secret:{tls['secretName']}/{keys['cert']}"
        assert files["AMQP_KEY_FILE"] == f"secret:{tls['secretName']}/{keys['key']}"
    else:
        assert set(files) == {"AMQP_URL_FILE"}


def keda_tls(rendered: Rendered) -> dict[str, str]:
    """The TLS parameters KEDA resolves for the trigger: parameter -> ``secret:``/``configmap:`` source or value."""
    spec = rendered.one("TriggerAuthentication")["spec"]
    found = {
        ref["parameter"]: f"secret:{ref['name']}/{ref['key']}"
        for ref in spec.get("secretTargetRef", [])
        if ref["parameter"] in ("ca", "cert", "key")
    }
    configmaps = {doc["metadata"]["name"]: doc["data"] for doc in rendered.of_kind("ConfigMap")}
    for ref in spec.get("configMapTargetRef", []):
        found[ref["parameter"]] = configmaps[ref["name"]][ref["key"]]
    return found


@pytest.mark.parametrize("scenario", scenario_params())
def test_keda_speaks_tls_with_the_workers_ca_and_client_certificate_when_they_do(scenario: Scenario) -> None:
    values = merged(scenario)
    if not values["autoscaling"]["enabled"]:
        pytest.skip("no KEDA in this scenario")
    rendered = render(scenario.values())
    tls = values["broker"]["tls"]
    found = keda_tls(rendered)
    if not tls["enabled"]:
        assert found == {}
        return
    files = rendered.secret_files()
    assert found == {
        "tls": "enable",
        "ca": files["AMQP_CA_FILE"],
        "cert": files["AMQP_CERT_FILE"],
        "key": files["AMQP_KEY_FILE"],
    }
    (trigger,) = rendered.one("ScaledObject")["spec"]["triggers"]
    assert urlsplit(trigger["metadata"]["host"]).scheme in ("https", "amqps")


def test_tls_without_a_client_certificate_mounts_and_passes_only_the_ca() -> None:
    values = deep_merge(
        deep_merge(INSTALL_TIME_TLS_CREDENTIALS, TLS_KEDA),
        {"broker": {"tls": {"enabled": True, "secretName": "ca-only", "secretKeys": {"cert": "", "key": ""}}}},
    )
    rendered = render(values)
    assert rendered.secret_files() == {
        "AMQP_URL_FILE": "secret:qinfer/amqp-url",
        "AMQP_CA_FILE": "secret:ca-only/ca.crt",
    }
    assert keda_tls(rendered) == {"tls": "enable", "ca": "secret:ca-only/ca.crt"}


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ({"broker": {"tls": {"enabled": True}}}, "broker.tls.enabled needs broker.tls.secretName"),
        (deep_merge(INSTALL_TIME_CREDENTIALS, TLS), "broker.auth.amqpUrl is not an amqps:// URL"),
        (
            deep_merge(INSTALL_TIME_TLS_CREDENTIALS, deep_merge(TLS, {"autoscaling": {"host": "http://rabbitmq:15672/"}})),
            "KEDA would send its broker password in clear text",
        ),
        (
            deep_merge(INSTALL_TIME_TLS_CREDENTIALS, deep_merge(TLS_KEDA, {"broker": {"tls": {
                "enabled": True, "secretName": "x", "secretKeys": {"cert": "tls.crt", "key": ""}}}})),
            "a client certificate needs its key",
        ),
    ],
    ids=["no secret", "amqp URL", "KEDA in clear text", "certificate without key"],
)  # fmt: skip
def test_tls_settings_that_cannot_work_are_refused(override: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm.HelmError, match=complaint):
        render(deep_merge(INSTALL_TIME_CREDENTIALS, override) if "auth" not in override.get("broker", {}) else override)


@pytest.mark.parametrize("scenario", scenario_params())
def test_the_network_policy_lets_workers_reach_only_the_broker_and_dns_and_only_monitoring_reach_them(
    scenario: Scenario,
) -> None:
    values = merged(scenario)
    rendered = render(scenario.values())
    fullname = rendered.one("Deployment")["metadata"]["name"]
    policies = [p for p in rendered.of_kind("NetworkPolicy") if p["metadata"]["name"] == fullname]
    if not values["networkPolicy"]["enabled"]:
        assert rendered.of_kind("NetworkPolicy") == []
        return
    (policy,) = policies
    spec = policy["spec"]
    pod_labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    settings = values["networkPolicy"]
    (ingress,) = spec["ingress"]
    (source,) = ingress["from"]
    assert source["namespaceSelector"] == settings["monitoring"]["namespaceSelector"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    broker, dns = spec["egress"]
    assert broker["to"] == [
        {
            "namespaceSelector": settings["broker"]["namespaceSelector"],
            **({"podSelector": settings["broker"]["podSelector"]} if settings["broker"]["podSelector"] else {}),
        }
    ]
    assert broker["ports"] == [{"port": port, "protocol": "TCP"} for port in settings["broker"]["ports"]]
    assert dns["to"] == [settings["dns"]]
    assert sorted((p["port"], p["protocol"]) for p in dns["ports"]) == [(53, "TCP"), (53, "UDP")]


def test_production_runs_mutual_tls_and_the_network_policy() -> None:
    (scenario,) = (p.values[0] for p in scenario_params() if p.values[0].name == "values-prod.yaml")
    values = merged(scenario)
    assert values["broker"]["tls"]["enabled"]
    assert values["networkPolicy"]["enabled"]
    assert "AMQP_CERT_FILE" in render(scenario.values()).secret_files()


@pytest.mark.parametrize("scenario", scenario_params())
def test_no_service_account_token_is_mounted(scenario: Scenario) -> None:
    rendered = render(scenario.values())
    assert rendered.one("Deployment")["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    for account in rendered.of_kind("ServiceAccount"):
        assert account["automountServiceAccountToken"] is False
