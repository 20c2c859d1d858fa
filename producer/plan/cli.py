"""``producer plan``: replay KEDA and the HPA against a load profile before deploying the values.

Reads the pod's figures (``worker calibrate --out`` plus ``worker coldstart --out``), a load (the load
test's profile flags, or a recorded ``report.json``) and a chart values file; prints p50/p99 latency,
requests past their deadline, backlog peak, time to drain, peak replicas and pod-seconds; writes a PNG
(and, with ``--timeline``, the replica timeline as JSON, which ``bench/plan_vs_real.py`` replays).
``--compare`` puts a second values file beside the first; ``--search`` looks for the cheapest values
meeting ``--p99`` / ``--max-past-deadline`` and prints them as a values fragment.

Wired into ``producer`` by :func:`add_plan_parser` and :func:`run_plan`; the work is in the pure modules
of :mod:`producer.plan`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from producer.loadtest.profiles import MODES, LoadTestConfigError, Profile
from producer.plan.control import Autoscaling
from producer.plan.pods import PlanInputError, PodModel, pod_model_from_calibration
from producer.plan.search import Goal, search
from producer.plan.simulate import Arrivals, PlanResult, simulate
from producer.plan.values import (
    arrivals_from_profile,
    autoscaling_from_values,
    profile_from_report,
    values_fragment,
    worker_values,
)

_DEFAULTS = Profile()
_CHART_VALUES = Path("charts/qinfer/values.yaml")


def add_plan_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to ``producer``'s subparsers and return its parser."""
    p = subparsers.add_parser(
        "plan",
        help="replay KEDA + HPA against a load profile: latency, backlog, cost, plot; search for values",
        description="Simulate what a load profile does with a set of autoscaling values: KEDA's polling, "
        "activation and cooldown, the HPA's formula, tolerance, policies and stabilization windows, pod cold "
        "start and SIGTERM drain, against a queue served at the pod's measured rows/s. Example: producer plan "
        "--calibration calibration.json --values my-values.yaml --compare other.yaml --plot plan.png",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pod = p.add_argument_group("pod (from `worker calibrate --out FILE` and `worker coldstart --out FILE`)")
    pod.add_argument("--calibration", type=Path, required=True, help="calibrate's JSON file, with a cold_start")
    pod.add_argument("--cold-start-s", type=float, default=None, help="pod creation to ready (default: the file's)")
    pod.add_argument("--pod-rows-per-s", type=float, default=None, help="one pod's rows/s at its best batch")
    values = p.add_argument_group("values")
    values.add_argument("--values", type=Path, default=None,
                        help=f"chart values file (default: {_CHART_VALUES}, else the chart defaults)")  # fmt: skip
    values.add_argument("--compare", type=Path, default=None, help="a second values file, planned side by side")
    values.add_argument("--metric-lag-s", type=float, default=5.0,
                        help="age of the management API's figures (collect_statistics_interval)")  # fmt: skip
    values.add_argument("--initial-replicas", type=int, default=None, help="ready pods at the start (default: min)")
    load = p.add_argument_group("load (the load test's profile flags, or --report)")
    load.add_argument("--report", type=Path, default=None, help="a load test's report.json: plan its profile")
    load.add_argument("--mode", choices=[m for m in MODES if m != "closed"], default=_DEFAULTS.mode)
    load.add_argument("--rate-per-s", type=float, default=_DEFAULTS.rate_per_s, help="rate (burst: before, after)")
    load.add_argument("--burst-rate-per-s", type=float, default=_DEFAULTS.burst_rate_per_s, help="rate in the burst")
    load.add_argument("--burst-start-s", type=float, default=_DEFAULTS.burst_start_s, help="when the burst starts")
    load.add_argument("--burst-duration-s", type=float, default=_DEFAULTS.burst_duration_s, help="burst length")
    load.add_argument("--duration-s", type=float, default=_DEFAULTS.duration_s, help="stop sending after this")
    load.add_argument("--seed", type=int, default=0, help="seed of Poisson arrivals")
    load.add_argument("--rows", type=int, default=1, help="rows per request")
    load.add_argument("--timeout-s", type=float, default=30.0, help="per-request deadline (0: none)")
    run = p.add_argument_group("simulation and output")
    run.add_argument("--tail-s", type=float, default=360.0,
                     help="simulate this long after sending stops (scale-in and its cost)")  # fmt: skip
    run.add_argument("--step-s", type=float, default=0.1, help="time step")
    run.add_argument("--plot", default="plan.png", help="PNG to write ('' for none)")
    run.add_argument("--timeline", type=Path, default=None, help="write the replica timeline as JSON")
    search_group = p.add_argument_group("search")
    search_group.add_argument("--search", action="store_true", help="find the cheapest values meeting the goal")
    search_group.add_argument("--p99", type=float, default=None, help="goal: p99 latency at most this (s)")
    search_group.add_argument("--max-past-deadline", type=int, default=0, help="goal: requests past deadline")
    return p


def _load_values(path: Path | None) -> tuple[dict[str, Any], str]:
    if path is None:
        if not _CHART_VALUES.is_file():
            return {}, "chart defaults"
        path = _CHART_VALUES
    try:
        import yaml
    except ImportError:
        raise PlanInputError("reading a values file needs PyYAML: pip install 'qinfer[plan]'") from None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PlanInputError(f"cannot read values file {path}: {e}") from e
    return (data or {}), str(path)


def _pod(args: argparse.Namespace, values: dict[str, Any]) -> PodModel:
    try:
        data = json.loads(args.calibration.read_text())
    except (OSError, ValueError) as e:
        raise PlanInputError(f"cannot read calibration {args.calibration}: {e}") from e
    worker = worker_values(values)
    prefetch = worker["prefetch"] * worker.get("processes", 1) if "prefetch" in worker else None
    return pod_model_from_calibration(
        data,
        max_batch=worker.get("maxBatch"),
        prefetch=prefetch,
        cold_start_s=args.cold_start_s,
        pod_rows_per_s=args.pod_rows_per_s,
    )


def _arrivals(args: argparse.Namespace) -> tuple[Arrivals, str]:
    if args.report is not None:
        try:
            report = json.loads(args.report.read_text())
        except (OSError, ValueError) as e:
            raise PlanInputError(f"cannot read report {args.report}: {e}") from e
        profile, rows, timeout_s = profile_from_report(report)
    else:
        profile = Profile(
            mode=args.mode,
            rate_per_s=args.rate_per_s,
            burst_rate_per_s=args.burst_rate_per_s,
            burst_start_s=args.burst_start_s,
            burst_duration_s=args.burst_duration_s,
            duration_s=args.duration_s,
            seed=args.seed,
        )
        rows, timeout_s = args.rows, args.timeout_s
    return arrivals_from_profile(profile, rows=rows, timeout_s=timeout_s), profile.describe()


def _line(label: str, r: PlanResult) -> str:
    s = r.summary()
    drain = "never" if s["drain_s"] is None else f"{s['drain_s']:.1f} s"
    return (
        f"{label}: p50 {s['p50_s']:.3f} s, p99 {s['p99_s']:.3f} s, past deadline {s['past_deadline']} of "
        f"{s['requests']}, backlog peak {s['backlog_peak']}, drain {drain}, peak replicas {s['peak_replicas']}, "
        f"{s['pod_seconds']:.0f} pod-s"
    )


def run_plan(args: argparse.Namespace) -> int:
    """Run ``producer plan``; 0 when planned (and, with --search, values found), 1 when none meet the goal,
    2 for bad input."""
    try:
        values, values_name = _load_values(args.values)
        pod = _pod(args, values)
        arrivals, described = _arrivals(args)
        sets: list[tuple[str, Autoscaling, float]] = []
        grace = float(values.get("terminationGracePeriodSeconds", 40))
        sets.append((values_name, autoscaling_from_values(values, metric_lag_s=args.metric_lag_s), grace))
        if args.compare is not None:
            other, other_name = _load_values(args.compare)
            grace_b = float(other.get("terminationGracePeriodSeconds", 40))
            sets.append((other_name, autoscaling_from_values(other, metric_lag_s=args.metric_lag_s), grace_b))
        if args.step_s <= 0 or args.tail_s < 0:
            raise PlanInputError("--step-s must be > 0 and --tail-s >= 0")
    except (PlanInputError, LoadTestConfigError, ValueError) as e:
        print(f"producer plan: {e}", file=sys.stderr)
        return 2
    horizon_s = (max(arrivals.times_s) if arrivals.times_s else 0.0) + args.tail_s
    print(
        f"load: {described}; {len(arrivals.times_s)} requests of {arrivals.rows} row(s), deadline "
        f"{arrivals.timeout_s:g} s. pod: {pod.best_rows_per_s:.0f} rows/s at batch {pod.max_batch}, prefetch "
        f"{pod.prefetch}, cold start {pod.cold_start_s:.1f} s"
    )
    results = []
    for name, autoscaling, grace in sets:
        result = simulate(
            autoscaling,
            pod,
            arrivals,
            horizon_s=horizon_s,
            step_s=args.step_s,
            initial_replicas=args.initial_replicas,
            drain_grace_s=grace,
        )
        results.append(result)
        print(_line(name, result))
    if args.plot:
        from producer.plan.plot import plot

        plot(Path(args.plot), results, [name for name, _, _ in sets], f"producer plan: {described}")
        print(f"plot: {args.plot}")
    if args.timeline is not None:
        first = results[0]
        args.timeline.write_text(
            json.dumps(
                {
                    "summary": first.summary(),
                    "step_s": args.step_s,
                    "t_s": first.timeline.t_s.tolist(),
                    "replicas": first.timeline.replicas.astype(int).tolist(),
                    "backlog": first.timeline.backlog.astype(int).tolist(),
                    "unacked": first.timeline.unacked.astype(int).tolist(),
                }
            )
            + "\n"
        )
        print(f"timeline: {args.timeline}")
    if not args.search:
        return 0
    goal = Goal(p99_s=args.p99, max_past_deadline=args.max_past_deadline)
    found, tried = search(sets[0][1], pod, arrivals, goal, horizon_s=horizon_s, step_s=max(args.step_s, 0.2))
    want = (f"p99 <= {args.p99:g} s, " if args.p99 is not None else "") + f"past deadline <= {args.max_past_deadline}"
    if not found:
        print(f"search: none of {tried} value sets meets {want}; raise maxReplicas or shorten the cold start")
        return 1
    best = found[0]
    print(f"search: {len(found)} of {tried} value sets meet {want}; the cheapest:")
    print(_line("  chosen", best))
    print(values_fragment(best.values, f"producer plan --search: {want}; {described}"))
    return 0
