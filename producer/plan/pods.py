"""One pod's service model for the planner: rows/s by batch size, prefetch and cold start.

Built from the JSON ``worker calibrate --out FILE`` writes (``rows_per_s`` by batch size on the device,
``pod_rows_per_s``, ``max_batch``, ``prefetch``, ``processes``) and the ``cold_start`` section
``worker coldstart --out FILE`` adds (``total_s``: process start to first reply). The in-process rates
are scaled so the best batch gives ``pod_rows_per_s`` (the pod's intake may be the limit, not the
device); between measured batch sizes the rate is interpolated linearly. Pure; called by the simulation
and the CLI.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping
from typing import Any


class PlanInputError(ValueError):
    """Raised when a planner input (calibration, values, profile) is missing a figure or out of range."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PodModel:
    """How fast one ready pod serves, and how long a new one takes to be ready.

    Args:
        rows_per_s: rows/s by batch size (rows per model run), for the whole pod.
        max_batch: most rows per run (``worker.maxBatch``).
        prefetch: messages one pod holds unacknowledged (``worker.prefetch`` x processes).
        cold_start_s: pod creation to ready (process start to first reply; add image pull and scheduling).
        overhead_s: fixed time per request outside the model (broker round trip, batching delay).
    """

    rows_per_s: Mapping[int, float]
    max_batch: int
    prefetch: int
    cold_start_s: float
    overhead_s: float = 0.005

    def __post_init__(self) -> None:
        if not self.rows_per_s or any(b < 1 or r <= 0 for b, r in self.rows_per_s.items()):
            raise PlanInputError("rows_per_s needs at least one batch size >= 1 with a positive rate")
        if self.max_batch < 1 or self.prefetch < 1:
            raise PlanInputError(f"max_batch ({self.max_batch}) and prefetch ({self.prefetch}) must be >= 1")
        if self.cold_start_s < 0 or self.overhead_s < 0:
            raise PlanInputError("cold_start_s and overhead_s must be >= 0")

    def rate(self, batch_rows: float) -> float:
        """Rows/s when a run holds ``batch_rows`` rows (capped at ``max_batch``)."""
        sizes = sorted(self.rows_per_s)
        b = min(max(batch_rows, sizes[0]), self.max_batch, sizes[-1])
        i = bisect.bisect_left(sizes, b)
        if sizes[i] == b or i == 0:
            return self.rows_per_s[sizes[i]]
        lo, hi = sizes[i - 1], sizes[i]
        w = (b - lo) / (hi - lo)
        return self.rows_per_s[lo] * (1 - w) + self.rows_per_s[hi] * w

    @property
    def best_rows_per_s(self) -> float:
        """Rows/s at ``max_batch``: what one pod sustains under a backlog."""
        return self.rate(self.max_batch)

    def with_changes(self, **changes: Any) -> PodModel:
        return dataclasses.replace(self, **changes)


def pod_model_from_calibration(
    data: Mapping[str, Any],
    *,
    max_batch: int | None = None,
    prefetch: int | None = None,
    cold_start_s: float | None = None,
    pod_rows_per_s: float | None = None,
) -> PodModel:
    """A :class:`PodModel` from calibrate's JSON; keyword arguments override its figures (``None``: keep).

    Raises:
        PlanInputError: a figure is missing (names what to run to get it).
    """
    try:
        table = {int(b): float(r) for b, r in data["rows_per_s"].items()}
    except (KeyError, AttributeError, ValueError) as e:
        raise PlanInputError("the calibration has no rows_per_s table; run `worker calibrate --out FILE`") from e
    batch = max_batch or int(data.get("max_batch", max(table)))
    if cold_start_s is None:
        cold = data.get("cold_start", {})
        if "total_s" not in cold:
            raise PlanInputError(
                "the calibration has no cold_start section; run `worker coldstart --out FILE` or pass --cold-start-s"
            )
        cold_start_s = float(cold["total_s"])
    pod_rate = pod_rows_per_s or float(data.get("pod_rows_per_s", 0)) or None
    model = PodModel(
        rows_per_s=table,
        max_batch=batch,
        prefetch=prefetch or int(data.get("prefetch", 16)) * int(data.get("processes", 1)),
        cold_start_s=cold_start_s,
    )
    if pod_rate is not None:
        scale = pod_rate / model.best_rows_per_s
        model = model.with_changes(rows_per_s={b: r * scale for b, r in table.items()})
    return model
