"""The cheapest autoscaling values that meet a goal, over a grid of the main knobs.

Tries every combination of ``targetQueueLength``, ``pollingIntervalSeconds``, ``cooldownPeriodSeconds``,
``minReplicas``, the scale-up ``podsPerPeriod`` and the scale-down stabilization window (each axis a list
of candidates; the rest of the values as given), simulates the load with each, keeps those meeting the
goal (p99 latency at most ``p99_s``, and at most ``max_past_deadline`` requests past their deadline) and
returns them cheapest first (pod-seconds; ties: lower p99). Pure; called by the CLI.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from producer.plan.control import Autoscaling, Policy
from producer.plan.pods import PodModel
from producer.plan.simulate import Arrivals, PlanResult, simulate


@dataclasses.dataclass(frozen=True, kw_only=True)
class Goal:
    """What the values must achieve: p99 latency (s, None: any) and requests past deadline allowed."""

    p99_s: float | None = None
    max_past_deadline: int = 0

    def met(self, result: PlanResult) -> bool:
        if result.past_deadline > self.max_past_deadline:
            return False
        return self.p99_s is None or result.percentile_s(99) <= self.p99_s


@dataclasses.dataclass(frozen=True, kw_only=True)
class Grid:
    """Candidates per knob; an empty tuple keeps the base value."""

    target: Sequence[float] = ()
    polling_s: Sequence[float] = (5, 15, 30)
    cooldown_s: Sequence[float] = (60, 300)
    min_replicas: Sequence[int] = (0, 1, 2)
    up_pods: Sequence[int] = (1, 4, 8)
    down_stabilization_s: Sequence[float] = (60, 300)


def default_targets(pod: PodModel, rows: int) -> list[float]:
    """``targetQueueLength`` candidates: above what a pod holds, up to about a minute of its work."""
    per_s = pod.best_rows_per_s / rows
    seconds = (1, 2, 5, 10, 30, 60)
    return sorted({max(pod.prefetch + 1, round(per_s * s)) for s in seconds})


def candidates(base: Autoscaling, grid: Grid, targets: Sequence[float]) -> list[Autoscaling]:
    """Every combination of the grid's axes applied to ``base``."""
    axes = [
        targets or [base.target],
        grid.polling_s or [base.polling_s],
        grid.cooldown_s or [base.cooldown_s],
        grid.min_replicas or [base.min_replicas],
        grid.up_pods or [base.scale_up.policies[0].value],
        grid.down_stabilization_s or [base.scale_down.stabilization_s],
    ]
    out = []
    for target, polling, cooldown, low, up_pods, down_s in itertools.product(*axes):
        if low > base.max_replicas:
            continue
        if low > 0 and cooldown != (grid.cooldown_s or [base.cooldown_s])[0]:
            continue  # cooldownPeriod only matters when scaling to zero: one candidate is enough
        up_policy = Policy(kind="Pods", value=int(up_pods), period_s=base.scale_up.policies[0].period_s)
        out.append(
            base.replace(
                target=float(target),
                polling_s=float(polling),
                cooldown_s=float(cooldown),
                min_replicas=int(low),
                scale_up=dataclasses.replace(base.scale_up, policies=(up_policy,)),
                scale_down=dataclasses.replace(base.scale_down, stabilization_s=float(down_s)),
            )
        )
    return out


def search(
    base: Autoscaling,
    pod: PodModel,
    arrivals: Arrivals,
    goal: Goal,
    *,
    horizon_s: float,
    grid: Grid | None = None,
    step_s: float = 0.2,
) -> tuple[list[PlanResult], int]:
    """The values meeting ``goal``, cheapest first, and how many were tried."""
    grid = grid or Grid()
    targets = list(grid.target) or default_targets(pod, arrivals.rows)
    tried = candidates(base, grid, targets)
    results = [simulate(v, pod, arrivals, horizon_s=horizon_s, step_s=step_s) for v in tried]
    meeting = [r for r in results if goal.met(r)]
    meeting.sort(key=lambda r: (r.pod_seconds, r.percentile_s(99)))
    return meeting, len(tried)
