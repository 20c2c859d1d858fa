"""Render the qinfer Helm chart with real Helm (helm-python-sdk embeds Helm's Go library) for tests.

A scenario is one values file of the chart (``values.yaml`` alone, ``values-<env>.yaml``, ``ci/*-values.yaml``)
plus the broker credentials an operator passes at install time with ``--set-string`` when the scenario does
not name an existing Secret.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "qinfer"
HELM_TEST_SCRIPT = CHART_DIR / "files" / "helm_test.py"
RELEASE_NAME = "qinfer"
NAMESPACE = "inference"

# What an operator passes with --set-string at install time; never part of a values file.
INSTALL_TIME_CREDENTIALS: dict[str, Any] = {
    "broker": {
        "auth": {
            "amqpUrl": "amqp://qinfer-worker:install-time-secret@rabbitmq.rabbitmq.svc:5672/",
            "kedaUsername": "keda-monitor",
            "kedaPassword": "install-time-secret",
        }
    }
}

# The same, for a broker that speaks TLS (broker.tls.enabled).
INSTALL_TIME_TLS_CREDENTIALS: dict[str, Any] = {
    "broker": {
        "auth": {
            **INSTALL_TIME_CREDENTIALS["broker"]["auth"],
            "amqpUrl": "amqps://qinfer-worker:install-time-secret@rabbitmq.rabbitmq.svc:5671/",
        }
    }
}

KEDA_GROUP = "keda.sh"
PROMETHEUS_OPERATOR_GROUP = "monitoring.coreos.com"


@dataclass(frozen=True)
class Scenario:
    """One way to install the chart: a values file (None: the defaults) plus install-time values."""

    name: str
    values_file: Path | None

    def file_values(self) -> dict[str, Any]:
        if self.values_file is None:
            return {}
        loaded = yaml.safe_load(self.values_file.read_text()) or {}
        assert isinstance(loaded, dict), f"{self.values_file} is not a mapping"
        return loaded

    def values(self) -> dict[str, Any]:
        """The values Helm receives: the file's, plus the credentials unless an existing Secret is named."""
        values = self.file_values()
        merged = Helm.load_chart().merge_values(values)
        if merged["broker"]["existingSecret"]:
            return values
        if merged["broker"]["tls"]["enabled"]:
            return deep_merge(values, INSTALL_TIME_TLS_CREDENTIALS)
        return deep_merge(values, INSTALL_TIME_CREDENTIALS)


def values_files() -> list[Path]:
    """Every values file the chart ships: the defaults, one per environment, one per CI scenario."""
    return [
        CHART_DIR / "values.yaml",
        *sorted(CHART_DIR.glob("values-*.yaml")),
        *sorted((CHART_DIR / "ci").glob("*-values.yaml")),
    ]


def scenarios() -> list[Scenario]:
    found = [Scenario("defaults", None)]
    found += [Scenario(path.name, path) for path in sorted(CHART_DIR.glob("values-*.yaml"))]
    found += [Scenario(f"ci/{path.name}", path) for path in sorted((CHART_DIR / "ci").glob("*-values.yaml"))]
    return found


def scenario_params() -> list[Any]:
    return [pytest.param(scenario, id=scenario.name) for scenario in scenarios()]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``override`` merged in, maps merged key by key (Helm's -f/--set order)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class Helm:
    """The chart, loaded once per process."""

    _chart: helm.Chart | None = None

    @classmethod
    def load_chart(cls) -> helm.Chart:
        if cls._chart is None:
            cls._chart = helm.Chart.load(CHART_DIR)
        return cls._chart


@dataclass(frozen=True)
class Rendered:
    """The manifests one render produced, parsed."""

    documents: list[dict[str, Any]]
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.documents if doc["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
        return found[0]

    def core(self) -> list[dict[str, Any]]:
        """Resources of Kubernetes itself (not of KEDA or the Prometheus operator)."""
        return [doc for doc in self.documents if api_group(doc) not in (KEDA_GROUP, PROMETHEUS_OPERATOR_GROUP)]

    def keda(self) -> list[dict[str, Any]]:
        return [doc for doc in self.documents if api_group(doc) == KEDA_GROUP]

    def worker_env(self) -> dict[str, str]:
        """Every environment variable the worker container gets: its ConfigMap's keys and its own env entries.

        Values from a Secret read as ``secret:<name>/<key>``.
        """
        container = worker_container(self.one("Deployment"))
        env: dict[str, str] = {}
        configmaps = {doc["metadata"]["name"]: doc for doc in self.of_kind("ConfigMap")}
        for source in container.get("envFrom", []):
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
        for entry in container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = entry["value"]
            else:
                ref = entry["valueFrom"]["secretKeyRef"]
                env[entry["name"]] = f"secret:{ref['name']}/{ref['key']}"
        return env

    def secret_files(self) -> dict[str, str]:
        """The worker's ``*_FILE`` settings, each resolved to the Secret key mounted there: ``secret:<name>/<key>``.

        Fails when such a file is not on a read-only Secret volume.
        """
        deployment = self.one("Deployment")
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}
        mounts = worker_container(deployment).get("volumeMounts", [])
        files: dict[str, str] = {}
        for name, value in self.worker_env().items():
            if not name.endswith("_FILE"):
                continue
            (mount,) = (m for m in mounts if value.startswith(m["mountPath"].rstrip("/") + "/"))
            assert mount.get("readOnly") is True, f"{name}: {mount['mountPath']} is not mounted read-only"
            secret = volumes[mount["name"]].get("secret")
            assert secret is not None, f"{name}: {mount['mountPath']} is not a Secret"
            path = value.removeprefix(mount["mountPath"].rstrip("/") + "/")
            (key,) = (item["key"] for item in secret["items"] if item["path"] == path)
            files[name] = f"secret:{secret['secretName']}/{key}"
        return files


def api_group(doc: dict[str, Any]) -> str:
    api_version: str = doc["apiVersion"]
    return api_version.split("/")[0] if "/" in api_version else ""


def hook_pod(rendered: Rendered) -> dict[str, Any] | None:
    """The ``helm test`` hook Pod, or None when the scenario renders none."""
    pods = [doc for doc in rendered.of_kind("Pod") if doc["metadata"].get("annotations", {}).get("helm.sh/hook")]
    assert len(pods) <= 1, f"expected at most one test Pod, rendered {len(pods)}"
    return pods[0] if pods else None


def assert_restricted_pod(pod: dict[str, Any]) -> None:
    """Fail unless a pod spec meets the "restricted" Pod Security Standard and mounts no API token."""
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "add" not in context["capabilities"]
        assert context["readOnlyRootFilesystem"] is True
        assert context.get("privileged", False) is False
    assert pod["automountServiceAccountToken"] is False


def load_helm_test_script() -> Any:
    """The chart's helm test script (files/helm_test.py) as a module, for its parser and its judge."""
    name = "qinfer_chart_helm_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HELM_TEST_SCRIPT)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


def worker_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    (container,) = (c for c in containers if c["name"] == "worker")
    return container  # type: ignore[no-any-return]


def render(values: dict[str, Any] | None = None) -> Rendered:
    """Render the chart as ``helm install`` would (no cluster contacted)."""
    manifests = Helm.load_chart().render(values=values, name=RELEASE_NAME, namespace=NAMESPACE, is_install=True)
    documents: list[dict[str, Any]] = []
    notes = ""
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        documents += [doc for doc in yaml.safe_load_all(text) if doc]
    return Rendered(documents, notes)


def keda_crds_dir() -> Path:
    """The folder of KEDA's CRDs, from KEDA_CRDS_DIR (relative paths are taken from the repository root)."""
    configured = os.environ.get("KEDA_CRDS_DIR")
    if not configured:
        pytest.skip("KEDA_CRDS_DIR is not set: it names the folder of KEDA's CRD YAML files (CI sets it)")
    path = Path(configured)
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not (path / "keda.sh_scaledobjects.yaml").is_file():
        pytest.skip(f"KEDA_CRDS_DIR={configured} holds no keda.sh_scaledobjects.yaml")
    return path
