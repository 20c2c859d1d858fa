"""The fault matrix at pytest sizes: real ``worker run`` processes, a real broker, one fault each.

Every scenario's checks live in :mod:`tests.chaos.harness` (``make chaos`` runs the same ones at
full size and prints the counter table). The broker restart disrupts every client of the broker,
so it runs here only with ``CHAOS_BROKER_RESTART=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.conftest import require_ctl
from tests.chaos.harness import BROKER_RESTART, SCENARIOS, Broker, Chaos, format_table, run_scenario

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def _params() -> list[object]:
    params: list[object] = []
    for name, (_scenario, needs) in SCENARIOS.items():
        marks = [pytest.mark.broker_restart] if BROKER_RESTART in needs else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", _params())
async def test_every_confirmed_request_ends_in_exactly_one_useful_outcome(
    name: str, chaos_broker: Broker, chaos_workdir: Path
) -> None:
    needs = SCENARIOS[name][1]
    if "ctl" in needs:
        require_ctl(chaos_broker)
    if BROKER_RESTART in needs and os.environ.get("CHAOS_BROKER_RESTART") != "1":
        pytest.skip("restarts the shared broker; set CHAOS_BROKER_RESTART=1 (make chaos runs it)")
    counters = await run_scenario(Chaos(chaos_broker, chaos_workdir / name, quick=True), name)
    assert counters.lost == 0, format_table([counters])
    assert not counters.failures, format_table([counters]) + "\n" + "\n".join(counters.failures)
