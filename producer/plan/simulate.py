"""The planner's queue model: requests arrive, pods start, hold, serve and drain, KEDA and the HPA decide.

Time advances in steps of ``step_s``. Each step:

1. requests due in the step join the queue (FIFO), each with its rows and deadline;
2. the :class:`~producer.plan.control.Controller` reads the metric (ready messages, plus what the pods
   hold unacknowledged when the trigger counts them, ``metric_lag_s`` old) and says how many replicas;
3. the pods follow: a new pod is ready ``cold_start_s`` after it is created; a pod removed while
   starting goes at once (the ReplicaSet removes pods that are not ready first, then the newest); a
   ready pod removed gets SIGTERM: it stops fetching, hands back what it holds beyond its current
   batch (to the head of the queue, as a requeue does) and finishes that batch, then goes;
4. every ready pod fills its prefetch window from the head of the queue; a request whose deadline has
   passed when it is fetched is not computed (the worker skips expired work) and counts past deadline;
5. every ready pod serves what it holds at its rate for the batch it can form (``PodModel.rate``); a
   request is answered when its rows are served, plus ``overhead_s``.

Pod-seconds count every pod from creation (a starting pod holds its GPU) until it is gone. Backlog is
what waits in the queue (ready messages: what the load test's depth readings see); the time to drain
is, as the load test reports it, from the end of the burst (or the peak, if later) to the first step
with an empty queue. Pure; called by the CLI and the search.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from producer.plan.control import Autoscaling, Controller
from producer.plan.pods import PodModel


@dataclasses.dataclass(frozen=True, kw_only=True)
class Arrivals:
    """What the load offers: due times (s from the start), rows per request and the per-request deadline.

    Args:
        times_s: when each request is due, ascending.
        rows: rows per request.
        timeout_s: deadline after the due time (0: none).
        burst_start_s: when the burst starts (for the plot).
        burst_end_s: when the load drops (end of the burst, or of sending): the time to drain counts from here.
    """

    times_s: Sequence[float]
    rows: int = 1
    timeout_s: float = 30.0
    burst_start_s: float = 0.0
    burst_end_s: float = 0.0


@dataclasses.dataclass
class _Pod:
    created_s: float
    ready_s: float
    held: collections.deque[int] = dataclasses.field(default_factory=collections.deque)
    credit_rows: float = 0.0
    draining: bool = False
    term_s: float = math.inf  # when it got SIGTERM


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Per-step series of a run."""

    t_s: np.ndarray
    replicas: np.ndarray  # asked for
    ready_pods: np.ndarray
    pods: np.ndarray  # existing (starting, ready, draining)
    backlog: np.ndarray  # ready messages in the queue
    unacked: np.ndarray  # held by pods


@dataclasses.dataclass(frozen=True)
class PlanResult:
    """How a load fared with one set of values."""

    values: Autoscaling
    pod: PodModel
    arrivals: Arrivals
    timeline: Timeline
    latency_s: np.ndarray  # per request, NaN when it was not answered in time
    answered_s: np.ndarray  # when each request was answered (NaN: expired or not answered)
    past_deadline: int
    pod_seconds: float
    end_s: float

    @property
    def requests(self) -> int:
        return len(self.latency_s)

    def percentile_s(self, q: float) -> float:
        """The ``q`` percentile of latency over all requests, those past their deadline counting as infinite."""
        if self.requests == 0:
            return 0.0
        values = np.where(np.isnan(self.latency_s), np.inf, self.latency_s)
        return float(np.percentile(values, q, method="higher"))

    @property
    def backlog_peak(self) -> int:
        return int(self.timeline.backlog.max()) if len(self.timeline.backlog) else 0

    @property
    def backlog_peak_at_s(self) -> float:
        return float(self.timeline.t_s[int(np.argmax(self.timeline.backlog))]) if self.backlog_peak else 0.0

    @property
    def drain_s(self) -> float | None:
        """Seconds from the burst end (or the backlog peak, if later) to an empty queue; None: never."""
        start = max(self.arrivals.burst_end_s, self.backlog_peak_at_s)
        t, backlog = self.timeline.t_s, self.timeline.backlog
        after = np.nonzero((t >= start) & (backlog == 0))[0]
        return float(t[after[0]] - self.arrivals.burst_end_s) if len(after) else None

    @property
    def peak_replicas(self) -> int:
        return int(self.timeline.replicas.max()) if len(self.timeline.replicas) else 0

    def summary(self) -> dict[str, float | int | None]:
        """The figures the CLI prints and the search compares."""
        return {
            "requests": self.requests,
            "p50_s": self.percentile_s(50),
            "p99_s": self.percentile_s(99),
            "past_deadline": self.past_deadline,
            "backlog_peak": self.backlog_peak,
            "drain_s": self.drain_s,
            "peak_replicas": self.peak_replicas,
            "pod_seconds": self.pod_seconds,
        }


def simulate(
    values: Autoscaling,
    pod: PodModel,
    arrivals: Arrivals,
    *,
    horizon_s: float,
    step_s: float = 0.1,
    initial_replicas: int | None = None,
    drain_grace_s: float = 40.0,
) -> PlanResult:
    """Replay ``arrivals`` against pods scaled by KEDA and the HPA with ``values``.

    Args:
        values: autoscaling values.
        pod: one pod's service model.
        arrivals: the load.
        horizon_s: simulate this long (scale-in after the load costs pod-seconds: make it cover it).
        step_s: time step.
        initial_replicas: ready replicas at time 0 (default: ``values.min_replicas``).
        drain_grace_s: a draining pod goes after this long at most (``terminationGracePeriodSeconds``).
    """
    times = np.asarray(arrivals.times_s, dtype=float)
    n = len(times)
    deadline = times + arrivals.timeout_s if arrivals.timeout_s > 0 else np.full(n, np.inf)
    latency = np.full(n, np.nan)
    answered = np.full(n, np.nan)
    expired = np.zeros(n, dtype=bool)
    rows = arrivals.rows
    controller = Controller(values, initial_replicas)
    start_replicas = controller.replicas
    pods: list[_Pod] = [_Pod(created_s=-pod.cold_start_s, ready_s=0.0) for _ in range(start_replicas)]
    queue: collections.deque[int] = collections.deque()
    steps = math.ceil(horizon_s / step_s)
    series = {k: np.zeros(steps) for k in ("t", "replicas", "ready", "pods", "backlog", "unacked")}
    metric_history: list[float] = []
    next_arrival = 0
    pod_seconds = 0.0
    lag_steps = round(values.metric_lag_s / step_s)

    def metric_at(t: float) -> float:
        i = min(int(t / step_s + 1e-9), len(metric_history) - 1) - lag_steps
        return metric_history[max(i, 0)] if metric_history else 0.0

    for k in range(steps):
        t = k * step_s
        end = t + step_s
        stop = bisect.bisect_left(times, end, lo=next_arrival)
        queue.extend(range(next_arrival, stop))
        next_arrival = stop
        held = sum(len(p.held) for p in pods)
        metric_history.append(len(queue) + (held if values.count_unacked else 0))
        wanted = controller.tick(t, metric_at)
        live = [p for p in pods if not p.draining]
        if wanted > len(live):
            pods += [_Pod(created_s=t, ready_s=t + pod.cold_start_s) for _ in range(wanted - len(live))]
        elif wanted < len(live):
            starting = sorted((p for p in live if p.ready_s > t), key=lambda p: -p.created_s)
            ready = sorted((p for p in live if p.ready_s <= t), key=lambda p: -p.created_s)
            for victim in (starting + ready)[: len(live) - wanted]:
                if victim.ready_s > t:
                    pods.remove(victim)
                    pod_seconds += t - max(victim.created_s, 0.0)
                    continue
                # SIGTERM: stop fetching, hand back what has not started, finish the current batch.
                victim.draining, victim.term_s = True, t
                keep = min(len(victim.held), max(1, math.ceil(pod.max_batch / rows)))
                back = list(victim.held)[keep:]
                for _ in back:
                    victim.held.pop()
                queue.extendleft(reversed(back))
        for p in pods:
            if p.ready_s > t or p.draining:
                continue
            while len(p.held) < pod.prefetch and queue:
                i = queue.popleft()
                if deadline[i] < t:
                    expired[i] = True
                    continue
                p.held.append(i)
        gone: list[_Pod] = []
        for p in pods:
            if p.ready_s > t:
                continue
            if not p.held:
                p.credit_rows = 0.0
            else:
                batch = min(len(p.held) * rows, pod.max_batch)
                rate = pod.rate(batch)
                p.credit_rows += rate * step_s
                while p.held and p.credit_rows >= rows:
                    i = p.held.popleft()
                    p.credit_rows -= rows
                    # Within the step at the rate's pace, never sooner after its arrival than its batch takes.
                    done = max(end - p.credit_rows / rate, times[i] + batch / rate) + pod.overhead_s
                    answered[i] = done
                    if done <= deadline[i]:
                        latency[i] = done - times[i]
            if p.draining and (not p.held or end - p.term_s >= drain_grace_s):
                queue.extendleft(reversed(p.held))  # not finished within the grace: redelivered
                gone.append(p)
        for p in gone:
            pods.remove(p)
            pod_seconds += end - max(p.created_s, 0.0)
        series["t"][k] = t
        series["replicas"][k] = wanted
        series["ready"][k] = sum(1 for p in pods if p.ready_s <= t and not p.draining)
        series["pods"][k] = len(pods)
        series["backlog"][k] = len(queue)
        series["unacked"][k] = sum(len(p.held) for p in pods)
    end_s = steps * step_s
    pod_seconds += sum(end_s - max(p.created_s, 0.0) for p in pods)  # pods there at 0 count from 0
    late = np.isnan(latency)
    timeline = Timeline(
        series["t"], series["replicas"], series["ready"], series["pods"], series["backlog"], series["unacked"]
    )
    return PlanResult(
        values=values,
        pod=pod,
        arrivals=arrivals,
        timeline=timeline,
        latency_s=latency,
        answered_s=answered,
        past_deadline=int(np.count_nonzero(late)),
        pod_seconds=pod_seconds,
        end_s=end_s,
    )
