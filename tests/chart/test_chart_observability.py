"""The Grafana dashboard and the PrometheusRule: rendered by real Helm, every query parsed by a real PromQL
parser, every worker metric they name one that the worker's ``/metrics`` serves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import promql_parser
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from producer.amqp.tracing import sampler_from_env, tracing_requested
from producer.wire.names import dead_letter_queue
from scripts import build_dashboard
from tests.chart.helpers import CHART_DIR, INSTALL_TIME_CREDENTIALS, NAMESPACE, Rendered, deep_merge, render
from worker.metrics import WorkerMetrics

ALERTS = {
    "QinferBacklogGrowingAtMaxReplicas",
    "QinferRequestsPastDeadlineBudget",
    "QinferErrorReplies",
    "QinferDeadLetterQueueNotEmpty",
    "QinferWorkersNotReady",
    "QinferRepliesHeld",
}
# Grafana's variables, as a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "2m", "$namespace": "inference", "$job": "qinfer", "$queue": "inference"}


def served_metric_names() -> set[str]:
    """Every sample name a worker's /metrics serves (the exposition of its registry, every family used)."""
    m = WorkerMetrics()
    m.requests.labels("ok").inc()
    m.model.info({"name": "m", "version": "1", "providers": "CPUExecutionProvider"})
    for histogram in (m.batch_rows, m.batch_requests, m.broker_seconds, m.batch_wait_seconds, m.compute_seconds,
                      m.reply_seconds):  # fmt: skip
        histogram.observe(1)
    text = generate_latest(m.registry).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def metric_names(expr: str) -> list[str]:
    """The metric names a PromQL expression selects; raises ValueError when it does not parse."""
    names: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.append(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def with_variables(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    return expr


def observability(**values: Any) -> Rendered:
    enabled = {"grafanaDashboard": {"enabled": True}, "prometheusRule": {"enabled": True}}
    return render(deep_merge(deep_merge(enabled, values), INSTALL_TIME_CREDENTIALS))


def dashboard_targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def rules(rendered: Rendered) -> dict[str, dict[str, Any]]:
    (group,) = rendered.one("PrometheusRule")["spec"]["groups"]
    return {rule["alert"]: rule for rule in group["rules"]}


def test_the_charts_dashboard_is_what_the_builder_builds() -> None:
    shipped = (CHART_DIR / "dashboards" / "qinfer-worker.json").read_text()
    assert shipped == build_dashboard.render(), "run: python scripts/build_dashboard.py"


def test_the_dashboard_configmap_carries_the_dashboard_for_the_grafana_sidecar() -> None:
    rendered = observability(grafanaDashboard={"enabled": True, "folder": "Inference"})
    (configmap,) = [c for c in rendered.of_kind("ConfigMap") if c["metadata"]["name"] == "qinfer-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Inference"}
    assert json.loads(configmap["data"]["qinfer-worker.json"]) == build_dashboard.dashboard()


def test_nothing_is_rendered_unless_asked_for() -> None:
    rendered = render(INSTALL_TIME_CREDENTIALS)
    assert not rendered.of_kind("PrometheusRule")
    assert [c["metadata"]["name"] for c in rendered.of_kind("ConfigMap")] == ["qinfer"]


def test_every_dashboard_query_parses_and_names_only_served_or_known_metrics() -> None:
    served = served_metric_names()
    used: set[str] = set()
    for title, expr in dashboard_targets(build_dashboard.dashboard()):
        try:
            names = metric_names(with_variables(expr))
        except ValueError as e:
            pytest.fail(f"panel {title!r}: {e}: {expr}")
        unknown = set(names) - served - set(build_dashboard.EXTERNAL_METRICS)
        assert not unknown, f"panel {title!r} names metrics nothing serves: {sorted(unknown)}"
        used |= set(names)
    families = {n.removesuffix(s) for n in served for s in ("_bucket", "_count", "_sum", "_total") if n.endswith(s)}
    for family in families - {"qinfer_model"}:
        assert any(n.startswith(family) for n in used), f"no panel shows {family}"


def test_the_dashboard_has_the_panels_an_operator_looks_for() -> None:
    titles = {p["title"] for p in build_dashboard.dashboard()["panels"]}
    assert {
        "Requests/s by outcome",
        "Rows/s",
        "Error replies by code",
        "Time in the broker",
        "Batch wait",
        "Compute",
        "Reply",
        "Rows per model run",
        "In flight",
        "Replies held and hand-backs",
        "Ready workers",
        "Replicas",
    } <= titles
    ids = [p["id"] for p in build_dashboard.dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_every_alert_parses_names_known_metrics_and_says_what_to_do() -> None:
    served = served_metric_names()
    found = rules(observability())
    assert set(found) == ALERTS
    for name, rule in found.items():
        try:
            names = metric_names(rule["expr"])
        except ValueError as e:
            pytest.fail(f"{name}: {e}: {rule['expr']}")
        unknown = set(names) - served - set(build_dashboard.EXTERNAL_METRICS)
        assert not unknown, f"{name} names metrics nothing serves: {sorted(unknown)}"
        assert rule["for"].endswith("m")
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert len(rule["annotations"]["description"]) > 80, f"{name}: say what to do"


def test_alerts_select_this_releases_workers_queues_and_autoscaler() -> None:
    rendered = observability(worker={"queue": "embeddings"})
    found = rules(rendered)
    job = rendered.one("Service")["metadata"]["name"]  # the ServiceMonitor's job label
    worker_selector = f'namespace="{NAMESPACE}", job="{job}"'
    for name in ("QinferRequestsPastDeadlineBudget", "QinferErrorReplies", "QinferRepliesHeld"):
        assert worker_selector in found[name]["expr"], name
    assert f'queue="{dead_letter_queue("embeddings")}"' in found["QinferDeadLetterQueueNotEmpty"]["expr"]
    hpa = f"keda-hpa-{rendered.one('ScaledObject')['metadata']['name']}"
    assert f'horizontalpodautoscaler="{hpa}"' in found["QinferBacklogGrowingAtMaxReplicas"]["expr"]
    assert 'queue="embeddings"' in found["QinferBacklogGrowingAtMaxReplicas"]["expr"]
    deployment = rendered.one("Deployment")["metadata"]["name"]
    assert f'deployment="{deployment}"' in found["QinferWorkersNotReady"]["expr"]


def test_alert_thresholds_and_labels_follow_the_values() -> None:
    found = rules(
        observability(
            prometheusRule={"deadlineBudgetSeconds": 12, "errorReplyRatio": 0.2, "alertLabels": {"severity": "page"}}
        )
    )
    assert found["QinferRequestsPastDeadlineBudget"]["expr"].endswith("> 12")
    assert found["QinferErrorReplies"]["expr"].endswith("> 0.2")
    assert {r["labels"]["severity"] for r in found.values()} == {"page"}


def test_without_autoscaling_there_is_no_max_replicas_alert() -> None:
    assert "QinferBacklogGrowingAtMaxReplicas" not in rules(observability(autoscaling={"enabled": False}))


def test_prometheus_templates_in_annotations_survive_helm() -> None:
    found = rules(observability())
    assert "{{ $value | humanizePercentage }}" in found["QinferErrorReplies"]["annotations"]["description"]
    assert "{{ $value }}" in found["QinferDeadLetterQueueNotEmpty"]["annotations"]["summary"]


def test_tracing_values_become_otel_variables_the_worker_accepts() -> None:
    env = render(
        deep_merge(
            {"tracing": {"enabled": True, "protocol": "grpc", "resourceAttributes": "deployment.environment=prod"}},
            INSTALL_TIME_CREDENTIALS,
        )
    ).worker_env()
    otel = {k: v for k, v in env.items() if k.startswith("OTEL_")}
    assert tracing_requested(otel)
    assert "0.01" in sampler_from_env(otel).get_description()
    assert otel["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert otel["OTEL_SERVICE_NAME"] == "qinfer"
    assert otel["OTEL_RESOURCE_ATTRIBUTES"] == f"k8s.namespace.name={NAMESPACE},deployment.environment=prod"


def test_without_tracing_values_the_worker_gets_no_otel_variables() -> None:
    env = render(INSTALL_TIME_CREDENTIALS).worker_env()
    assert not [k for k in env if k.startswith("OTEL_")]
    assert not tracing_requested(env)
