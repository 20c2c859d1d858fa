"""Load profiles: schedules, bounds and option checks."""

from __future__ import annotations

import itertools

import pytest

from producer.loadtest.profiles import LoadTestConfigError, Profile, send_offsets


def test_constant_rate_spaces_requests_evenly_from_zero() -> None:
    offsets = list(send_offsets(Profile(mode="constant", rate_per_s=10, duration_s=1)))
    assert offsets == pytest.approx([i / 10 for i in range(10)])


def test_max_requests_stops_the_schedule_before_the_duration() -> None:
    profile = Profile(mode="constant", rate_per_s=100, duration_s=10, max_requests=7)
    assert len(list(send_offsets(profile))) == 7
    assert profile.expected_requests() == 7


def test_burst_steps_up_for_its_window_and_back_down() -> None:
    profile = Profile(
        mode="burst", rate_per_s=10, burst_rate_per_s=100, burst_start_s=1, burst_duration_s=0.5, duration_s=2
    )
    offsets = list(send_offsets(profile))
    assert offsets == sorted(offsets)
    before = [t for t in offsets if t < 1]
    during = [t for t in offsets if 1 <= t < 1.5]
    after = [t for t in offsets if t >= 1.5]
    assert (len(before), len(during), len(after)) == (10, 50, 5)
    assert len(offsets) == profile.expected_requests() == 65
    assert profile.burst_window_s == (1, 1.5)


def test_burst_at_the_start_has_no_empty_phase() -> None:
    profile = Profile(
        mode="burst", rate_per_s=1, burst_rate_per_s=10, burst_start_s=0, burst_duration_s=1, duration_s=2
    )
    assert [p.rate_per_s for p in profile.phases()] == [10, 1]
    assert list(send_offsets(profile))[:2] == pytest.approx([0.0, 0.1])


def test_poisson_arrivals_average_the_rate_and_repeat_for_a_seed() -> None:
    profile = Profile(mode="poisson", rate_per_s=1000, duration_s=10, seed=3)
    offsets = list(send_offsets(profile))
    assert offsets == list(send_offsets(profile))
    assert offsets != list(send_offsets(Profile(mode="poisson", rate_per_s=1000, duration_s=10, seed=4)))
    assert 9500 < len(offsets) < 10500
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert max(gaps) > 3 * min(gaps)  # exponential gaps, not an even spacing
    assert all(0 <= t < 10 for t in offsets)


def test_closed_mode_has_no_schedule() -> None:
    profile = Profile(mode="closed", concurrency=4, duration_s=1)
    assert not profile.open_loop
    assert profile.phases() == []
    with pytest.raises(LoadTestConfigError, match="closed mode"):
        list(send_offsets(profile))


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"mode": "constant", "rate_per_s": 0}, "--rate-per-s"),
        ({"duration_s": 0}, "--duration-s"),
        ({"max_requests": 0}, "--max-requests"),
        ({"mode": "closed", "concurrency": 0}, "--concurrency"),
        ({"mode": "burst", "burst_start_s": 20, "burst_duration_s": 10, "duration_s": 25}, "--duration-s"),
        ({"mode": "burst", "burst_rate_per_s": -1}, "--burst-rate-per-s"),
        ({"mode": "sine"}, "--mode"),
    ],
)
def test_invalid_options_fail_naming_the_option(options: dict[str, object], names: str) -> None:
    with pytest.raises(LoadTestConfigError, match=names):
        Profile(**options)  # type: ignore[arg-type]


def test_the_default_profile_is_a_burst_that_fits_its_duration() -> None:
    profile = Profile()
    assert profile.mode == "burst"
    window = profile.burst_window_s
    assert window is not None
    assert 0 < window[0] < window[1] < profile.duration_s
    assert "burst" in profile.describe()
