"""producer.plan's pure core: the KEDA + HPA control loop, the queue model, values and the search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from producer.loadtest.profiles import Profile
from producer.plan.control import Autoscaling, Controller, Policy, Rules
from producer.plan.pods import PlanInputError, PodModel, pod_model_from_calibration
from producer.plan.search import Goal, Grid, search
from producer.plan.simulate import Arrivals, simulate
from producer.plan.values import CHART_DEFAULTS, arrivals_from_profile, autoscaling_from_values, values_fragment
from worker.coldstart import phases, summarize

CHART = Path(__file__).resolve().parents[2] / "charts" / "qinfer" / "values.yaml"
FAST_UP = Rules(stabilization_s=0, policies=(Policy(kind="Pods", value=10, period_s=15),))
NO_DOWN = Rules(stabilization_s=0, policies=(Policy(kind="Pods", value=10, period_s=15),))


def values(**changes: object) -> Autoscaling:
    base = Autoscaling(
        min_replicas=1, max_replicas=10, target=100, polling_s=15, scale_up=FAST_UP, scale_down=NO_DOWN, metric_lag_s=0
    )
    return base.replace(**changes)


def constant(metric: float) -> object:
    return lambda _t: metric


def test_the_hpa_asks_for_ceil_of_metric_over_target() -> None:
    controller = Controller(values())
    assert controller.tick(0, lambda _t: 250) == 3


def test_a_ratio_within_the_tolerance_keeps_the_replicas() -> None:
    controller = Controller(values(), replicas=2)
    assert controller.tick(0, lambda _t: 2 * 100 * 1.08) == 2
    assert Controller(values(), replicas=2).tick(0, lambda _t: 2 * 100 * 1.15) == 3


def test_scale_up_is_bounded_by_the_pods_policy_per_period() -> None:
    one_per_minute = Rules(stabilization_s=0, policies=(Policy(kind="Pods", value=1, period_s=60),))
    controller = Controller(values(scale_up=one_per_minute, hpa_sync_s=15))
    seen = [controller.tick(t, lambda _t: 1000) for t in (0, 15, 30, 45, 60, 75)]
    assert seen == [2, 2, 2, 2, 3, 3]


def test_a_percent_policy_rounds_up() -> None:
    double = Rules(stabilization_s=0, policies=(Policy(kind="Percent", value=100, period_s=60),))
    assert Controller(values(scale_up=double), replicas=3).tick(0, lambda _t: 5000) == 6


def test_scale_down_waits_for_the_stabilization_window() -> None:
    slow_down = Rules(stabilization_s=60, policies=(Policy(kind="Pods", value=10, period_s=15),))
    controller = Controller(values(scale_down=slow_down))
    load = {0.0: 500.0}
    seen = [controller.tick(t, lambda t: load.get(t, 0.0)) for t in (0, 15, 30, 45, 60, 75)]
    assert seen == [5, 5, 5, 5, 5, 1]  # the 5 recommended at 0 s falls out of the window after 60 s


def test_keda_wakes_from_zero_past_activation_and_returns_to_zero_after_cooldown() -> None:
    controller = Controller(values(min_replicas=0, activation=5, cooldown_s=40), replicas=0)
    assert controller.tick(0, lambda _t: 5) == 0  # not above activation
    assert controller.tick(15, lambda _t: 6) == 1
    quiet = [controller.tick(t, lambda _t: 0) for t in (30, 45, 60)]
    assert quiet == [1, 1, 0]  # last active at 15 s: zero once 40 s have passed


def pod(rate: float = 100.0, cold_start_s: float = 2.0, prefetch: int = 8) -> PodModel:
    return PodModel(rows_per_s={1: rate / 4, 8: rate}, max_batch=8, prefetch=prefetch, cold_start_s=cold_start_s)


def test_the_pod_rate_is_interpolated_between_measured_batches() -> None:
    model = pod()
    assert model.rate(1) == 25
    assert model.rate(8) == 100
    assert 25 < model.rate(4) < 100
    assert model.rate(64) == 100  # capped at max_batch


def test_a_load_within_one_pod_leaves_no_backlog_and_answers_everything() -> None:
    arrivals = Arrivals(times_s=[i * 0.1 for i in range(100)], burst_end_s=10)
    result = simulate(values(), pod(), arrivals, horizon_s=20)
    assert result.past_deadline == 0
    assert result.backlog_peak <= 1
    assert result.percentile_s(99) < 0.2
    assert result.pod_seconds == pytest.approx(20, abs=0.2)


def test_a_burst_beyond_one_pod_builds_a_backlog_that_more_pods_drain() -> None:
    burst = Arrivals(times_s=[i / 500 for i in range(2000)], burst_end_s=4)  # 500/s for 4 s; a pod does 100
    alone = simulate(values(max_replicas=1), pod(), burst, horizon_s=60)
    scaled = simulate(values(target=50, polling_s=5, hpa_sync_s=5), pod(), burst, horizon_s=60)
    assert alone.peak_replicas == 1
    assert scaled.peak_replicas > 1
    assert alone.backlog_peak > 1000
    assert scaled.drain_s is not None
    assert alone.drain_s is not None
    assert scaled.drain_s < alone.drain_s
    assert scaled.percentile_s(99) < alone.percentile_s(99)
    assert scaled.past_deadline == alone.past_deadline == 0


def test_no_request_is_answered_sooner_than_its_rows_take() -> None:
    arrivals = Arrivals(times_s=[i * 0.037 for i in range(300)], burst_end_s=11)
    model = pod(rate=1000)
    result = simulate(values(), model, arrivals, horizon_s=15)
    assert result.latency_s.min() >= 1 / model.rate(1) + model.overhead_s - 1e-9


def test_requests_waiting_past_their_deadline_are_counted_and_not_served() -> None:
    burst = Arrivals(times_s=[i / 500 for i in range(2000)], timeout_s=2.0, burst_end_s=4)
    result = simulate(values(max_replicas=1), pod(), burst, horizon_s=60)
    assert result.past_deadline > 1000
    assert result.percentile_s(99) == float("inf")


def test_scale_in_hands_back_held_messages_and_loses_none() -> None:
    # Two pods with a deep prefetch; the HPA removes one while both hold work.
    arrivals = Arrivals(times_s=[i / 150 for i in range(600)], burst_end_s=4)
    result = simulate(
        values(target=10_000, min_replicas=1), pod(prefetch=400), arrivals, horizon_s=60, initial_replicas=2
    )
    assert result.timeline.replicas[-1] == 1
    assert result.past_deadline == 0  # every request answered, none lost with the removed pod


def test_the_planner_defaults_are_the_charts() -> None:
    chart = yaml.safe_load(CHART.read_text())["autoscaling"]
    for key, value in CHART_DEFAULTS.items():
        assert chart[key] == value, key


def test_chart_values_become_the_control_loop_and_back() -> None:
    chart = yaml.safe_load(CHART.read_text())
    a = autoscaling_from_values(chart)
    assert a.target == chart["autoscaling"]["targetQueueLength"]
    assert a.scale_down.stabilization_s == chart["autoscaling"]["scaleDown"]["stabilizationWindowSeconds"]
    again = autoscaling_from_values(yaml.safe_load(values_fragment(a, "round trip")))
    assert again == a


def test_a_bad_value_names_the_problem() -> None:
    with pytest.raises(PlanInputError, match="autoscaling values"):
        autoscaling_from_values({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}})


def test_the_profile_becomes_the_load_tests_schedule() -> None:
    profile = Profile(
        mode="burst", rate_per_s=10, burst_rate_per_s=100, burst_start_s=2, burst_duration_s=1, duration_s=5
    )
    arrivals = arrivals_from_profile(profile)
    assert len(arrivals.times_s) == profile.expected_requests()
    assert (arrivals.burst_start_s, arrivals.burst_end_s) == (2, 3)


def test_a_calibration_without_a_cold_start_says_what_to_run() -> None:
    with pytest.raises(PlanInputError, match="worker coldstart"):
        pod_model_from_calibration({"rows_per_s": {"1": 10.0}})
    model = pod_model_from_calibration({"rows_per_s": {"1": 10.0, "8": 40.0}, "max_batch": 8, "pod_rows_per_s": 20.0,
                                        "prefetch": 16, "processes": 2, "cold_start": {"total_s": 3.5}})  # fmt: skip
    assert (model.best_rows_per_s, model.prefetch, model.cold_start_s) == (20.0, 32, 3.5)


def test_the_search_returns_the_cheapest_values_meeting_the_goal() -> None:
    burst = Arrivals(times_s=[i / 300 for i in range(1200)], burst_end_s=4)
    goal = Goal(p99_s=3.0)
    grid = Grid(target=(20, 200), polling_s=(5,), cooldown_s=(30,), min_replicas=(1, 3), up_pods=(4,),
                down_stabilization_s=(30,))  # fmt: skip
    found, tried = search(values(hpa_sync_s=5), pod(), burst, goal, horizon_s=40, grid=grid)
    assert tried == 4
    assert found
    assert all(goal.met(r) for r in found)
    assert [r.pod_seconds for r in found] == sorted(r.pod_seconds for r in found)


def test_cold_start_phases_come_from_the_marks() -> None:
    marks = {"imports_done": 101.0, "session_created": 101.5, "warmed": 102.0, "consuming": 102.1}
    run = phases(100.0, marks, 102.3)
    assert run == pytest.approx(
        {"interpreter_and_imports": 1.0, "session": 0.5, "warm_up": 0.5, "connect": 0.1, "first_reply": 0.2}
    )
    summary = summarize([run, {**run, "session": 2.0}])
    assert summary["dominant"] == "session"
    assert summary["total_s"] == pytest.approx(sum(summary["median_s"].values()))


def test_calibrate_and_coldstart_share_one_file_the_planner_reads(tmp_path: Path) -> None:
    from worker.calibrate import Calibration, plan_capacity, write_figures
    from worker.coldstart import merge_into

    path = tmp_path / "calibration.json"
    merge_into(path, {"total_s": 4.0, "dominant": "session"})
    calibration = Calibration({1: 10.0, 8: 40.0}, max_batch=8, prefetch=16, rows_per_message=1, queueing_delay_s=30)
    write_figures(path, plan_capacity(calibration, 0.001, on_cpu=False, cpus=2), model="m", providers=["CPU"])
    merge_into(path, {"total_s": 3.0, "dominant": "imports"})  # a later cold start replaces only its section
    model = pod_model_from_calibration(json.loads(path.read_text()))
    assert (model.cold_start_s, model.max_batch, model.prefetch, model.best_rows_per_s) == (3.0, 8, 16, 40.0)
