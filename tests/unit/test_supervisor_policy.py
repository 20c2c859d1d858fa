"""The supervisor's pure parts: ``--processes auto`` from the cgroup quota, the restart backoff and death budget."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.settings import Settings, SettingsError, to_env
from worker.supervisor import DeathBudget, available_cpus, cgroup_cpu_limit, resolve_processes

CORES = len(os.sched_getaffinity(0))


def _cgroup(tmp_path: Path, cpu_max: str | None = None, v1: tuple[int, int] | None = None) -> Path:
    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return tmp_path


@pytest.mark.parametrize(
    ("cpu_max", "v1", "limit"),
    [
        pytest.param("150000 100000", None, 1.5, id="v2-quota"),
        pytest.param("max 100000", None, None, id="v2-unlimited"),
        pytest.param(None, (300000, 100000), 3.0, id="v1-quota"),
        pytest.param(None, (-1, 100000), None, id="v1-unlimited"),
        pytest.param(None, None, None, id="no-cgroup"),
    ],
)
def test_the_cgroup_quota_is_read_from_v2_or_v1(
    tmp_path: Path, cpu_max: str | None, v1: tuple[int, int] | None, limit: float | None
) -> None:
    assert cgroup_cpu_limit(_cgroup(tmp_path, cpu_max, v1)) == limit


def test_auto_is_the_quota_rounded_up_and_never_more_than_the_cores(tmp_path: Path) -> None:
    assert available_cpus(_cgroup(tmp_path, "50000 100000")) == 1
    assert available_cpus(_cgroup(tmp_path, f"{CORES * 100000 + 1} 100000")) == CORES
    assert available_cpus(_cgroup(tmp_path, "max 100000")) == CORES


def test_processes_auto_resolves_and_a_number_is_kept(tmp_path: Path) -> None:
    root = _cgroup(tmp_path, "100000 100000")
    assert Settings.from_env({"WORKER_PROCESSES": "auto"}).processes == 0
    assert resolve_processes(Settings.from_env({"WORKER_PROCESSES": "AUTO"}), root) == 1
    assert resolve_processes(Settings.from_env({"WORKER_PROCESSES": "3"}), root) == 3
    with pytest.raises(SettingsError, match="WORKER_PROCESSES is 'many'; use a number of processes or auto"):
        Settings.from_env({"WORKER_PROCESSES": "many"})
    with pytest.raises(SettingsError, match=r"WORKER_PROCESSES \(--processes\) is 300; it must be between 0 and 256"):
        Settings.from_env({"WORKER_PROCESSES": "300"})


def test_settings_pass_to_consumer_processes_through_their_environment_unchanged() -> None:
    settings = Settings(max_batch=8, group_by_length=False, drain_timeout_s=2.5, processes=4, exit_when_idle=True)
    assert Settings.from_env(to_env(settings)) == settings


def test_the_backoff_doubles_per_death_of_a_slot_up_to_the_cap_and_forgets_old_deaths() -> None:
    budget = DeathBudget(max_deaths=10, window_s=60, backoff_max_s=3)
    delays = []
    for t in range(4):
        budget.record(0, float(t))
        delays.append(budget.backoff_s(0, float(t)))
    assert delays == [0.5, 1.0, 2.0, 3.0]
    assert budget.backoff_s(1, 4.0) == 0.5  # another slot's deaths do not slow this one down
    assert budget.backoff_s(0, 100.0) == 0.5  # deaths out of the window are forgotten


def test_the_budget_runs_out_at_max_deaths_within_the_window_over_every_slot() -> None:
    budget = DeathBudget(max_deaths=3, window_s=10, backoff_max_s=30)
    budget.record(0, 0.0)
    budget.record(1, 5.0)
    assert not budget.exhausted(5.0)
    budget.record(0, 11.0)  # the first death has left the window
    assert not budget.exhausted(11.0)
    budget.record(1, 12.0)
    assert budget.exhausted(12.0)
    assert budget.in_window(12.0) == 3
