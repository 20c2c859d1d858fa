"""KEDA and the HPA as the planner replays them: how many replicas the Deployment asks for, and when.

Modelled as KEDA and Kubernetes document them (and as the chart's ScaledObject configures them):

* **KEDA** (ScaledObject spec, keda.sh/docs/latest/reference/scaledobject-spec; rabbitmq scaler,
  keda.sh/docs/scalers/rabbitmq-queue): every ``pollingInterval`` seconds KEDA reads the queue; the
  trigger is *active* while the metric exceeds ``activationValue``. From zero replicas an active
  trigger scales the Deployment to one (KEDA itself, not the HPA); with ``minReplicaCount: 0``, once
  no trigger has been active for ``cooldownPeriod`` seconds KEDA scales it back to zero. Between 1 and
  ``maxReplicaCount`` the HPA KEDA creates decides.
* **The metric**: mode ``QueueLength`` over the management API (``protocol: http``) counts ready plus
  unacknowledged messages, so what the pods hold in their prefetch windows counts; over AMQP only the
  ready ones. The management API's figures are up to ``collect_statistics_interval`` (5 s by default)
  old: ``metric_lag_s``.
* **The HPA** (kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale, "Algorithm details"
  and "Configurable scaling behavior"): every sync period (``--horizontal-pod-autoscaler-sync-period``,
  15 s) it computes, for KEDA's external metric with an ``AverageValue`` target,
  ``desired = ceil(metric / target)``, unless the usage ratio ``metric / (target x current)`` is
  within the tolerance (0.1) of 1, when it keeps ``current``. Recommendations are kept: scaling up
  takes the lowest of those within ``scaleUp.stabilizationWindowSeconds`` (default 0), scaling down
  the highest within ``scaleDown.stabilizationWindowSeconds`` (default 300). Then the policies bound
  the change: per policy the replicas at the start of its ``periodSeconds`` window plus ``value`` pods
  (or ``value`` percent, rounded up; down: minus, rounded down), ``selectPolicy: Max`` taking the policy
  allowing the largest change (``Min`` the smallest, ``Disabled`` none); the result is clamped to
  ``[max(1, minReplicaCount), maxReplicaCount]``.

Pure: :class:`Controller` is stepped by the simulation with the time and a metric reader.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

PolicyKind = Literal["Pods", "Percent"]
Select = Literal["Max", "Min", "Disabled"]

HPA_SYNC_S = 15.0
"""The controller manager's ``--horizontal-pod-autoscaler-sync-period`` default."""
HPA_TOLERANCE = 0.1
"""The HPA's default tolerance (``--horizontal-pod-autoscaler-tolerance``)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Policy:
    """One HPA scaling policy: at most ``value`` pods (or percent) per ``period_s``."""

    kind: PolicyKind = "Pods"
    value: int = 4
    period_s: float = 15.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rules:
    """One direction of the HPA's ``behavior``: stabilization window, policies, selectPolicy."""

    stabilization_s: float
    policies: tuple[Policy, ...]
    select: Select = "Max"


DEFAULT_SCALE_UP = Rules(
    stabilization_s=0.0, policies=(Policy(kind="Pods", value=4, period_s=15), Policy(kind="Percent", value=100))
)
DEFAULT_SCALE_DOWN = Rules(stabilization_s=300.0, policies=(Policy(kind="Percent", value=100, period_s=15),))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Autoscaling:
    """The values that decide how the replicas follow the queue (the chart's ``autoscaling.*``).

    Args:
        min_replicas: ``minReplicaCount`` (0: scale to zero).
        max_replicas: ``maxReplicaCount``.
        target: ``targetQueueLength``, messages per replica.
        activation: ``activationQueueLength``.
        polling_s: ``pollingInterval``.
        cooldown_s: ``cooldownPeriod`` (to zero only).
        scale_up, scale_down: the HPA's behavior.
        count_unacked: the metric counts unacknowledged messages (``protocol: http``).
        metric_lag_s: how old the metric is when read (management statistics interval).
        hpa_sync_s: the HPA's sync period.
        tolerance: the HPA's tolerance.
    """

    min_replicas: int = 1
    max_replicas: int = 8
    target: float = 1024
    activation: float = 0
    polling_s: float = 15.0
    cooldown_s: float = 300.0
    scale_up: Rules = DEFAULT_SCALE_UP
    scale_down: Rules = DEFAULT_SCALE_DOWN
    count_unacked: bool = True
    metric_lag_s: float = 5.0
    hpa_sync_s: float = HPA_SYNC_S
    tolerance: float = HPA_TOLERANCE

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                f"replicas: min {self.min_replicas}, max {self.max_replicas}; need 0 <= min <= max and max >= 1"
            )
        if self.target <= 0 or self.activation < 0:
            raise ValueError(f"targetQueueLength must be > 0 ({self.target}), activation >= 0 ({self.activation})")
        if self.polling_s <= 0 or self.hpa_sync_s <= 0 or self.cooldown_s < 0:
            raise ValueError("pollingInterval and the HPA sync period must be > 0, cooldownPeriod >= 0")

    def replace(self, **changes: object) -> Autoscaling:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _limit(current: int, events: list[tuple[float, int]], now: float, rules: Rules, *, up: bool) -> int:
    """The most (up) or fewest (down) replicas ``rules``' policies allow now, given past changes."""
    if rules.select == "Disabled" or not rules.policies:
        return current
    proposals = []
    for policy in rules.policies:
        changed = sum(delta for t, delta in events if now - t < policy.period_s)  # + for up events, - for down
        start = current - changed
        if policy.kind == "Pods":
            proposals.append(start + policy.value if up else start - policy.value)
        elif up:
            proposals.append(math.ceil(start * (1 + policy.value / 100)))
        else:
            proposals.append(math.floor(start * (1 - policy.value / 100)))
    largest_change = max(proposals) if up else min(proposals)
    smallest_change = min(proposals) if up else max(proposals)
    return largest_change if rules.select == "Max" else smallest_change


class Controller:
    """KEDA plus its HPA, stepped in time. ``replicas`` is what the Deployment asks for now.

    Args:
        values: the autoscaling values.
        replicas: replicas at time 0 (default: ``min_replicas``).
    """

    def __init__(self, values: Autoscaling, replicas: int | None = None) -> None:
        self.values = values
        self.replicas = values.min_replicas if replicas is None else replicas
        self._recommendations: list[tuple[float, int]] = []
        self._up_events: list[tuple[float, int]] = []
        self._down_events: list[tuple[float, int]] = []
        self._last_active_s = 0.0
        self._next_poll_s = 0.0
        self._next_sync_s = 0.0

    def tick(self, now_s: float, metric: Callable[[float], float]) -> int:
        """Advance to ``now_s``: KEDA's polls and the HPA's syncs due by then; ``metric(t)`` reads the
        queue as KEDA sees it at ``t``. Returns the replicas asked for."""
        v = self.values
        while min(self._next_poll_s, self._next_sync_s) <= now_s + 1e-9:
            if self._next_poll_s <= self._next_sync_s:
                self._poll(self._next_poll_s, metric(self._next_poll_s))
                self._next_poll_s += v.polling_s
            else:
                self._sync(self._next_sync_s, metric(self._next_sync_s))
                self._next_sync_s += v.hpa_sync_s
        return self.replicas

    def _poll(self, t: float, value: float) -> None:
        v = self.values
        if value > v.activation:
            self._last_active_s = t
            if self.replicas == 0:
                self.replicas = 1  # KEDA activates the Deployment; the HPA scales from there
                self._up_events.append((t, 1))
        elif self.replicas > 0 and v.min_replicas == 0 and t - self._last_active_s >= v.cooldown_s:
            self._down_events.append((t, -self.replicas))
            self.replicas = 0
            self._recommendations.clear()

    def _sync(self, t: float, value: float) -> None:
        v = self.values
        current = self.replicas
        if current == 0:
            return  # at zero the HPA is idle; KEDA wakes the Deployment
        ratio = value / (v.target * current)
        proposal = current if abs(ratio - 1) <= v.tolerance else math.ceil(value / v.target)
        floor = max(1, v.min_replicas)
        proposal = min(max(proposal, floor), v.max_replicas)
        self._recommendations.append((t, proposal))
        keep = max(v.scale_up.stabilization_s, v.scale_down.stabilization_s)
        self._recommendations = [(ts, r) for ts, r in self._recommendations if t - ts <= keep]
        up = min(r for ts, r in self._recommendations if t - ts <= v.scale_up.stabilization_s)
        down = max(r for ts, r in self._recommendations if t - ts <= v.scale_down.stabilization_s)
        desired = current
        desired = max(desired, up)
        desired = min(desired, down)
        if desired > current:
            desired = min(desired, _limit(current, self._up_events, t, v.scale_up, up=True), v.max_replicas)
        elif desired < current:
            desired = max(desired, _limit(current, self._down_events, t, v.scale_down, up=False), floor)
        if desired != current:
            (self._up_events if desired > current else self._down_events).append((t, desired - current))
            self.replicas = desired
