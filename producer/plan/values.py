"""The chart's values as planner inputs: ``autoscaling.*`` as an :class:`Autoscaling`, ``worker.*`` for the pod.

Reads the keys ``charts/qinfer/values.yaml`` documents and ``templates/scaledobject.yaml`` renders
(``minReplicas``, ``maxReplicas``, ``targetQueueLength``, ``activationQueueLength``,
``pollingIntervalSeconds``, ``cooldownPeriodSeconds``, ``protocol``, ``scaleUp``/``scaleDown``
``stabilizationWindowSeconds``, ``podsPerPeriod``, ``periodSeconds``), each falling back to the chart's
default, and writes a values fragment back (:func:`values_fragment`). Also the load: a load-test
profile (or a recorded ``report.json``) as :class:`~producer.plan.simulate.Arrivals`. Pure (dicts in,
dicts and text out); called by the CLI and the search.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from producer.loadtest.profiles import Profile, send_offsets
from producer.plan.control import Autoscaling, Policy, Rules
from producer.plan.pods import PlanInputError
from producer.plan.simulate import Arrivals

CHART_DEFAULTS: dict[str, Any] = {
    "minReplicas": 1,
    "maxReplicas": 8,
    "targetQueueLength": 1024,
    "activationQueueLength": 0,
    "pollingIntervalSeconds": 15,
    "cooldownPeriodSeconds": 300,
    "protocol": "http",
    "scaleDown": {"stabilizationWindowSeconds": 300, "podsPerPeriod": 1, "periodSeconds": 60},
    "scaleUp": {"stabilizationWindowSeconds": 0, "podsPerPeriod": 4, "periodSeconds": 30},
}
"""The chart's ``autoscaling`` defaults (kept equal to values.yaml by a test)."""


def _rules(given: Mapping[str, Any], default: Mapping[str, Any]) -> Rules:
    merged = {**default, **given}
    return Rules(
        stabilization_s=float(merged["stabilizationWindowSeconds"]),
        policies=(Policy(kind="Pods", value=int(merged["podsPerPeriod"]), period_s=float(merged["periodSeconds"])),),
    )


def autoscaling_from_values(values: Mapping[str, Any], *, metric_lag_s: float = 5.0) -> Autoscaling:
    """The :class:`Autoscaling` a chart values document (the whole file) configures.

    Raises:
        PlanInputError: a value is of the wrong type or out of range (names the key).
    """
    given = values.get("autoscaling") or {}
    if not isinstance(given, Mapping):
        raise PlanInputError("autoscaling must be a mapping of the chart's autoscaling.* keys")
    a = {**CHART_DEFAULTS, **given}
    try:
        return Autoscaling(
            min_replicas=int(a["minReplicas"]),
            max_replicas=int(a["maxReplicas"]),
            target=float(a["targetQueueLength"]),
            activation=float(a["activationQueueLength"]),
            polling_s=float(a["pollingIntervalSeconds"]),
            cooldown_s=float(a["cooldownPeriodSeconds"]),
            scale_up=_rules(a.get("scaleUp") or {}, CHART_DEFAULTS["scaleUp"]),
            scale_down=_rules(a.get("scaleDown") or {}, CHART_DEFAULTS["scaleDown"]),
            count_unacked=a["protocol"] == "http",
            metric_lag_s=metric_lag_s if a["protocol"] == "http" else 0.0,
        )
    except (TypeError, ValueError) as e:
        raise PlanInputError(f"autoscaling values: {e}") from e


def worker_values(values: Mapping[str, Any]) -> dict[str, int]:
    """``worker.maxBatch``, ``worker.prefetch`` and ``worker.processes`` where the values set them."""
    worker = values.get("worker") or {}
    return {k: int(worker[k]) for k in ("maxBatch", "prefetch", "processes") if k in worker}


def values_fragment(a: Autoscaling, title: str) -> str:
    """``a`` as the ``autoscaling:`` block of a values file."""
    up, down = a.scale_up, a.scale_down
    return "\n".join(
        [
            f"# {title}",
            "autoscaling:",
            f"  minReplicas: {a.min_replicas}",
            f"  maxReplicas: {a.max_replicas}",
            f"  targetQueueLength: {a.target:g}",
            f"  activationQueueLength: {a.activation:g}",
            f"  pollingIntervalSeconds: {a.polling_s:g}",
            f"  cooldownPeriodSeconds: {a.cooldown_s:g}",
            "  scaleDown:",
            f"    stabilizationWindowSeconds: {down.stabilization_s:g}",
            f"    podsPerPeriod: {down.policies[0].value}",
            f"    periodSeconds: {down.policies[0].period_s:g}",
            "  scaleUp:",
            f"    stabilizationWindowSeconds: {up.stabilization_s:g}",
            f"    podsPerPeriod: {up.policies[0].value}",
            f"    periodSeconds: {up.policies[0].period_s:g}",
        ]
    )


def arrivals_from_profile(profile: Profile, *, rows: int = 1, timeout_s: float = 30.0) -> Arrivals:
    """The requests an open-loop load-test profile sends.

    Raises:
        PlanInputError: for a closed-loop profile (its arrivals depend on the replies).
    """
    if not profile.open_loop:
        raise PlanInputError("a closed-loop profile has no schedule to plan for; use constant, poisson or burst")
    window = profile.burst_window_s
    return Arrivals(
        times_s=list(send_offsets(profile)),
        rows=rows,
        timeout_s=timeout_s,
        burst_start_s=window[0] if window else 0.0,
        burst_end_s=window[1] if window else profile.duration_s,
    )


def profile_from_report(report: Mapping[str, Any]) -> tuple[Profile, int, float]:
    """The profile, rows per request and per-request timeout a load test's ``report.json`` recorded."""
    try:
        fields = {k: v for k, v in report["profile"].items() if k != "description"}
        profile = Profile(**fields)
    except (KeyError, TypeError) as e:
        raise PlanInputError(f"the report has no usable profile: {e}") from e
    payload = report.get("payload") or {}
    target = report.get("target") or {}
    return profile, int(payload.get("rows", 1)), float(target.get("timeout_s", 30.0))
