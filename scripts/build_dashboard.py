"""Build the worker's Grafana dashboard (``charts/qinfer/dashboards/qinfer-worker.json``) from the metric names.

Every query is written here, once; the chart ships the JSON this prints and the chart tests check
that the file is up to date, that every query parses as PromQL, and that every ``qinfer_*`` name is
one the worker's ``/metrics`` serves. The other names come from kube-state-metrics (replicas,
readiness) and RabbitMQ's Prometheus plugin (queue depth).

Usage: python scripts/build_dashboard.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parents[1] / "charts" / "qinfer" / "dashboards" / "qinfer-worker.json"
UID = "qinfer-worker"

W = 'namespace="$namespace", job="$job"'  # the worker pods of one release (the ServiceMonitor's job label)
NOT_REPLIES = "requeued|dead_lettered|reply_held"  # outcomes that are not a reply sent
ERROR_REPLY = f'outcome!~"ok|{NOT_REPLIES}"'
RATE = "$__rate_interval"

# Metrics other exporters provide, by exporter (the dashboard and the alerts name no others).
KUBE_STATE_METRICS = (
    "kube_deployment_spec_replicas",
    "kube_deployment_status_replicas",
    "kube_deployment_status_replicas_available",
    "kube_deployment_status_replicas_unavailable",
    "kube_horizontalpodautoscaler_spec_max_replicas",
    "kube_horizontalpodautoscaler_status_current_replicas",
    "kube_horizontalpodautoscaler_status_desired_replicas",
)
RABBITMQ_QUEUE_MESSAGES = "rabbitmq_detailed_queue_messages"
"""Messages in a queue (ready + unacknowledged), per queue, from RabbitMQ's Prometheus plugin
(``/metrics/detailed?family=queue_coarse_metrics``)."""
EXTERNAL_METRICS = (*KUBE_STATE_METRICS, RABBITMQ_QUEUE_MESSAGES)


def quantiles(metric: str, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[tuple[str, str]]:
    """``histogram_quantile`` queries of one histogram over the release's workers, one per quantile."""
    return [
        (
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{W}}}[{RATE}])))",
            f"p{round(q * 100):g}",
        )
        for q in qs
    ]


class Layout:
    """Places panels on Grafana's 24-column grid, row after row."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self._y = 0
        self._x = 0
        self._row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {"type": "row", "title": title, "collapsed": False, "id": len(self.panels) + 1,
             "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y}, "panels": []}
        )  # fmt: skip
        self._y += 1

    def _newline(self) -> None:
        self._y += self._row_height
        self._x = 0
        self._row_height = 0

    def panel(
        self,
        title: str,
        description: str,
        targets: list[tuple[str, str]],
        *,
        unit: str = "short",
        kind: str = "timeseries",
        width: int = 8,
        height: int = 8,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if self._x + width > 24:
            self._newline()
        panel: dict[str, Any] = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": height, "w": width, "x": self._x, "y": self._y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [
                {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "range": True}
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        panel.update(extra or {})
        self.panels.append(panel)
        self._x += width
        self._row_height = max(self._row_height, height)


def panels() -> list[dict[str, Any]]:
    """Every panel of the dashboard, in reading order."""
    g = Layout()
    g.row("Traffic")
    g.panel(
        "Requests/s by outcome",
        "Requests settled per second: ok, an error code, or not answered (requeued, dead_lettered).",
        [(f'sum by (outcome) (rate(qinfer_requests_total{{{W}, outcome!="reply_held"}}[{RATE}]))', "{{outcome}}")],
        unit="reqps",
    )
    g.panel("Rows/s", "Rows computed per second (a request may carry several rows).",
            [(f"sum(rate(qinfer_rows_total{{{W}}}[{RATE}]))", "rows/s")], unit="ops")  # fmt: skip
    g.panel(
        "Error replies by code",
        "Error replies per second by code (wrong_shape, deadline_exceeded, inference_failed, ...).",
        [(f"sum by (outcome) (rate(qinfer_requests_total{{{W}, {ERROR_REPLY}}}[{RATE}]))", "{{outcome}}")],
        unit="reqps",
    )
    g.row("Where the time goes")
    for metric, title, text in (
        ("qinfer_broker_seconds", "Time in the broker", "Publish to delivery (needs the x-published-ms header)."),
        ("qinfer_batch_wait_seconds", "Batch wait", "Delivery to the start of the request's model run."),
        ("qinfer_compute_seconds", "Compute", "Duration of one model run."),
        ("qinfer_reply_seconds", "Reply", "End of a model run to the broker's confirm of its replies."),
    ):
        g.panel(title, text, quantiles(metric), unit="s", width=6)
    g.row("Batches")
    g.panel(
        "Rows per model run",
        "How many rows each model run carried (the batch size distribution).",
        [(f"sum by (le) (increase(qinfer_batch_rows_bucket{{{W}}}[{RATE}]))", "{{le}}")],
        kind="heatmap",
        width=12,
        extra={"options": {"calculate": False, "yAxis": {"unit": "short"}, "cellGap": 1}},
    )
    g.panel(
        "Mean rows and requests per model run",
        "Rows and requests per model run, averaged over the interval.",
        [
            (
                f"sum(rate(qinfer_batch_rows_sum{{{W}}}[{RATE}])) / sum(rate(qinfer_batch_rows_count{{{W}}}[{RATE}]))",
                "rows",
            ),
            (
                f"sum(rate(qinfer_batch_requests_sum{{{W}}}[{RATE}])) / "
                f"sum(rate(qinfer_batch_requests_count{{{W}}}[{RATE}]))",
                "requests",
            ),
        ],
        width=12,
    )
    g.row("Workers")
    g.panel("In flight", "Requests received and not yet settled, per pod (at most the prefetch window).",
            [(f"sum by (pod) (qinfer_inflight_requests{{{W}}})", "{{pod}}")])  # fmt: skip
    g.panel(
        "Replies held and hand-backs",
        "Replies the broker refused and the worker holds for a retry; requests handed back or dead-lettered; "
        "redeliveries.",
        [
            (f'sum(rate(qinfer_requests_total{{{W}, outcome="reply_held"}}[{RATE}]))', "reply held"),
            (f'sum(rate(qinfer_requests_total{{{W}, outcome="requeued"}}[{RATE}]))', "requeued"),
            (f'sum(rate(qinfer_requests_total{{{W}, outcome="dead_lettered"}}[{RATE}]))', "dead-lettered"),
            (f"sum(rate(qinfer_redelivered_total{{{W}}}[{RATE}]))", "redelivered"),
        ],
        unit="reqps",
    )
    g.panel(
        "Queue depth",
        "Messages in the request queue and its dead-letter queue (RabbitMQ's per-queue metrics).",
        [
            (f'sum({RABBITMQ_QUEUE_MESSAGES}{{queue="$queue"}})', "$queue"),
            (f'sum({RABBITMQ_QUEUE_MESSAGES}{{queue="$queue.dead"}})', "$queue.dead"),
        ],
    )
    g.panel(
        "Ready workers",
        "Worker pods ready (model warmed, consuming, not draining, not stalled) against those wanted.",
        [
            ('sum(kube_deployment_status_replicas_available{namespace="$namespace", deployment="$job"})', "ready"),
            ('sum(kube_deployment_spec_replicas{namespace="$namespace", deployment="$job"})', "wanted"),
        ],
        width=12,
    )
    g.panel(
        "Replicas",
        "Worker replicas, what KEDA's autoscaler wants, and its maximum.",
        [
            ('sum(kube_deployment_status_replicas{namespace="$namespace", deployment="$job"})', "replicas"),
            (
                'sum(kube_horizontalpodautoscaler_status_desired_replicas{namespace="$namespace", '
                'horizontalpodautoscaler="keda-hpa-$job"})',
                "desired",
            ),
            (
                'sum(kube_horizontalpodautoscaler_spec_max_replicas{namespace="$namespace", '
                'horizontalpodautoscaler="keda-hpa-$job"})',
                "max",
            ),
        ],
        width=12,
    )
    return g.panels


def variable(name: str, query: str, label: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "refresh": 2,
        "sort": 1,
        "includeAll": False,
        "multi": False,
    }


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    return {
        "uid": UID,
        "title": "qinfer workers",
        "description": "Requests, rows, latency by stage, batches, in-flight work, readiness and replicas of one "
        "qinfer release. Built by scripts/build_dashboard.py.",
        "tags": ["qinfer", "rabbitmq", "onnxruntime"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "utc",
        "templating": {
            "list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
                variable("namespace", "label_values(qinfer_model_info, namespace)", "Namespace"),
                variable("job", 'label_values(qinfer_model_info{namespace="$namespace"}, job)', "Release"),
                {
                    "name": "queue",
                    "label": "Request queue",
                    "type": "textbox",
                    "query": "inference",
                    "current": {"text": "inference", "value": "inference"},
                },
            ]
        },
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the chart's JSON is not what this builds")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python scripts/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
