"""``worker calibrate``: throughput by batch size on this hardware, and the settings that follow.

Runs the model in this process (no broker) on synthetic requests shaped like real ones, for each
batch size, and derives:

* ``--max-batch``: the smallest batch within 5 % of the best throughput (larger batches only add
  latency);
* ``--prefetch``: a few batches, so the next batch is already waiting while one computes;
* the KEDA ``targetQueueLength``: one replica's throughput times the accepted queueing delay, kept above
  the prefetch (see docs/deploy.md).

The in-process rate is the ceiling of what a worker reaches through the broker; the load test
(``make load-test``) measures the rest.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from producer.protocol import InferRequest
from worker.session import Pipeline

_VOCABULARY = (
    "the a of to in is was for on that with as by at from this it an be are or which queue worker model batch "
    "request reply service cluster message broker network memory engine river season team city station history"
)
_WORDS = _VOCABULARY.split(" ")
_FREE_DIM = 16  # size given to free non-batch dimensions of tensor inputs
_NEAR_BEST = 0.95


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Rows/s by batch size and the settings derived from them."""

    rows_per_s: dict[int, float]
    max_batch: int
    prefetch: int
    rows_per_message: int
    queueing_delay_s: float

    @property
    def messages_per_s(self) -> float:
        return self.rows_per_s[self.max_batch] / self.rows_per_message

    @property
    def keda_target(self) -> int:
        return max(math.ceil(self.messages_per_s * self.queueing_delay_s), self.prefetch + 1)


def synthetic_requests(pipeline: Pipeline, count: int, *, seed: int = 0) -> list[InferRequest]:
    """``count`` one-row requests shaped for ``pipeline``: texts of mixed length, or random tensors."""
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    requests = []
    for i in range(count):
        inputs: dict[str, Any] = {}
        for spec in pipeline.inputs.values():
            if spec.datatype == "BYTES":
                words = rng.randint(6, 10) if i % 2 else rng.randint(40, 60)
                inputs[spec.name] = np.array([" ".join(rng.choice(_WORDS) for _ in range(words))], dtype=object)
            else:
                shape = (1, *[d or _FREE_DIM for d in spec.shape[1:]])
                inputs[spec.name] = (nprng.standard_normal(shape) * 2).astype(spec.dtype)
        requests.append(InferRequest(id=str(i), inputs=inputs))
    return requests


def measure(pipeline: Pipeline, batch_sizes: Sequence[int], *, seconds_per_size: float = 2.0,
            progress: Callable[[int, float], None] | None = None) -> dict[int, float]:  # fmt: skip
    """Rows/s of ``pipeline`` at each batch size (one-row requests, batched as the worker would)."""
    results: dict[int, float] = {}
    for batch in batch_sizes:
        prepared = [pipeline.prepare(r, max_rows=batch) for r in synthetic_requests(pipeline, max(batch, 64))]
        # As the worker batches: compatible requests together, of similar padded length.
        prepared.sort(key=lambda p: (str(pipeline.batch_key(p)), pipeline.padding_length(p) or 0))
        pipeline.run(prepared[:batch])  # warm this size
        rows = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds_per_size or rows == 0:
            for start in range(0, len(prepared), batch):
                part = prepared[start : start + batch]
                pipeline.run(part)
                rows += len(part)
        results[batch] = rows / elapsed
        if progress is not None:
            progress(batch, results[batch])
    return results


def calibrate(
    pipeline: Pipeline,
    batch_sizes: Sequence[int],
    *,
    rows_per_message: int = 1,
    queueing_delay_s: float = 30.0,
    seconds_per_size: float = 2.0,
    progress: Callable[[int, float], None] | None = None,
) -> Calibration:
    """Measure ``pipeline`` and derive max batch, prefetch and the KEDA target."""
    rates = measure(pipeline, batch_sizes, seconds_per_size=seconds_per_size, progress=progress)
    best = max(rates.values())
    max_batch = min(b for b, r in rates.items() if r >= _NEAR_BEST * best)
    prefetch = max(2 * math.ceil(max_batch / rows_per_message), 16)
    return Calibration(rates, max_batch, prefetch, rows_per_message, queueing_delay_s)
