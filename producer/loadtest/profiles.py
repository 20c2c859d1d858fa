"""Load profiles: when to send (open loop) or how many to keep in flight (closed loop).

Pure: a :class:`Profile` is validated data, and :func:`send_offsets` turns an open-loop profile into the
seconds (from the start of the run) at which each request is due. The runner follows that schedule and
measures latency from the due time, so a generator that falls behind does not hide queueing
(no coordinated omission); how far it fell behind is reported as the ``send_lag`` stage.

Modes:

* ``constant``: ``rate_per_s`` evenly spaced.
* ``poisson``: ``rate_per_s`` on average, exponential gaps (seeded), the arrivals of many independent users.
* ``burst``: ``rate_per_s``, then ``burst_rate_per_s`` from ``burst_start_s`` for ``burst_duration_s``,
  then back to ``rate_per_s``: a step up and back down.
* ``closed``: ``concurrency`` requests in flight; each reply sends the next (throughput at a fixed load).

Every mode stops at ``duration_s`` or after ``max_requests``, whichever comes first.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator
from typing import Literal

from producer.wire.errors import InferenceError

Mode = Literal["constant", "poisson", "burst", "closed"]
MODES: tuple[Mode, ...] = ("constant", "poisson", "burst", "closed")


class LoadTestConfigError(InferenceError, ValueError):
    """Raised when a load profile or payload option is out of range or conflicts with another."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phase:
    """A stretch of the run at one rate: ``[start_s, end_s)``."""

    start_s: float
    end_s: float
    rate_per_s: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Profile:
    """What load to offer.

    Args:
        mode: one of :data:`MODES`.
        rate_per_s: requests per second (constant, poisson; burst: the rate before and after the burst).
        burst_rate_per_s: requests per second during the burst (burst mode).
        burst_start_s: seconds from the start to the burst (burst mode).
        burst_duration_s: length of the burst in seconds (burst mode).
        concurrency: requests kept in flight (closed mode).
        duration_s: stop sending after this many seconds.
        max_requests: stop sending after this many requests (None: no limit).
        seed: seed of the Poisson arrivals.
    """

    mode: Mode = "burst"
    rate_per_s: float = 10.0
    burst_rate_per_s: float = 150.0
    burst_start_s: float = 5.0
    burst_duration_s: float = 4.0
    concurrency: int = 8
    duration_s: float = 25.0
    max_requests: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LoadTestConfigError(f"--mode is {self.mode!r}; allowed: {', '.join(MODES)}")
        if not 0 < self.duration_s <= 24 * 3600:
            raise LoadTestConfigError(f"--duration-s is {self.duration_s:g}; it must be between 0 (excluded) and 86400")
        if self.max_requests is not None and self.max_requests < 1:
            raise LoadTestConfigError(f"--max-requests is {self.max_requests}; it must be at least 1")
        if self.mode in ("constant", "poisson", "burst") and not 0 < self.rate_per_s <= 1_000_000:
            raise LoadTestConfigError(f"--rate-per-s is {self.rate_per_s:g}; it must be between 0 (excluded) and 1e6")
        if self.mode == "burst":
            if not 0 < self.burst_rate_per_s <= 1_000_000:
                raise LoadTestConfigError(
                    f"--burst-rate-per-s is {self.burst_rate_per_s:g}; it must be between 0 (excluded) and 1e6"
                )
            if self.burst_start_s < 0 or self.burst_duration_s <= 0:
                raise LoadTestConfigError("--burst-start-s must be >= 0 and --burst-duration-s > 0")
            if self.burst_start_s + self.burst_duration_s > self.duration_s:
                raise LoadTestConfigError(
                    f"the burst ends at {self.burst_start_s + self.burst_duration_s:g} s, after --duration-s "
                    f"{self.duration_s:g}; lengthen the run or move the burst"
                )
        if self.mode == "closed" and not 1 <= self.concurrency <= 100_000:
            raise LoadTestConfigError(f"--concurrency is {self.concurrency}; it must be between 1 and 100000")

    @property
    def open_loop(self) -> bool:
        """True for the modes that send on a schedule, whatever the replies do."""
        return self.mode != "closed"

    @property
    def burst_window_s(self) -> tuple[float, float] | None:
        """``(start_s, end_s)`` of the burst, or None outside burst mode."""
        if self.mode != "burst":
            return None
        return (self.burst_start_s, self.burst_start_s + self.burst_duration_s)

    def phases(self) -> list[Phase]:
        """The open-loop schedule as phases of constant rate (empty for closed mode)."""
        if self.mode == "closed":
            return []
        if self.mode != "burst":
            return [Phase(start_s=0.0, end_s=self.duration_s, rate_per_s=self.rate_per_s)]
        start, end = self.burst_start_s, self.burst_start_s + self.burst_duration_s
        phases = [
            Phase(start_s=0.0, end_s=start, rate_per_s=self.rate_per_s),
            Phase(start_s=start, end_s=end, rate_per_s=self.burst_rate_per_s),
            Phase(start_s=end, end_s=self.duration_s, rate_per_s=self.rate_per_s),
        ]
        return [p for p in phases if p.end_s > p.start_s]

    def expected_requests(self) -> int | None:
        """How many requests the schedule holds (open loop; Poisson: on average), capped by ``max_requests``;
        for closed mode ``max_requests``."""
        if self.mode == "closed":
            return self.max_requests
        total = sum(math.ceil((p.end_s - p.start_s) * p.rate_per_s - 1e-9) for p in self.phases())
        return total if self.max_requests is None else min(total, self.max_requests)

    def describe(self) -> str:
        """One line saying what this profile does, for the report and the terminal."""
        if self.mode == "closed":
            load = f"closed loop, {self.concurrency} in flight"
        elif self.mode == "burst":
            load = (
                f"burst: {self.rate_per_s:g}/s, {self.burst_rate_per_s:g}/s from {self.burst_start_s:g} s "
                f"for {self.burst_duration_s:g} s, then {self.rate_per_s:g}/s"
            )
        else:
            load = f"{self.mode} {self.rate_per_s:g}/s"
        bound = f" or {self.max_requests} requests" if self.max_requests is not None else ""
        return f"{load}; {self.duration_s:g} s{bound}"


def send_offsets(profile: Profile) -> Iterator[float]:
    """Seconds from the start at which each request is due, in order (open-loop modes only).

    Constant and burst phases space requests evenly (the first at the phase start); Poisson draws
    exponential gaps with mean ``1 / rate_per_s`` from a generator seeded with ``profile.seed``.

    Raises:
        LoadTestConfigError: for closed mode, which has no schedule.
    """
    if not profile.open_loop:
        raise LoadTestConfigError("closed mode has no send schedule; it sends when a reply arrives")
    limit = profile.max_requests if profile.max_requests is not None else math.inf
    sent = 0
    if profile.mode == "poisson":
        rng = random.Random(profile.seed)
        t = rng.expovariate(profile.rate_per_s)
        while t < profile.duration_s and sent < limit:
            yield t
            sent += 1
            t += rng.expovariate(profile.rate_per_s)
        return
    for phase in profile.phases():
        gap_s = 1.0 / phase.rate_per_s
        i = 0
        while sent < limit:
            t = phase.start_s + i * gap_s
            if t >= phase.end_s - 1e-9:
                break
            yield t
            sent += 1
            i += 1
