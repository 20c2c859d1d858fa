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

The capacity plan (:func:`plan_capacity`) adds the host side: one consumer process's intake rate
(decoding, checking and preparing a request and encoding its reply, measured here, plus the AMQP
work per message, which needs a broker to measure and is given as ``broker_ms_per_message``), and
from it the consumer processes per pod (``worker run --processes``) that keep the device busy,
with the prefetch, CPU request and KEDA target that follow, as a values file fragment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from producer.wire.names import CONTENT_TYPE_MSGPACK
from producer.wire.protocol import InferRequest, decode_request, encode_reply, encode_request
from worker.pipelines.session import Pipeline

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


def _packed_requests(pipeline: Pipeline, rows_per_message: int, count: int) -> list[InferRequest]:
    """``count`` requests of ``rows_per_message`` rows each, shaped for ``pipeline``."""
    rows = synthetic_requests(pipeline, count * rows_per_message, seed=1)
    packed = []
    for i in range(count):
        part = rows[i * rows_per_message : (i + 1) * rows_per_message]
        inputs = {name: np.concatenate([r.inputs[name] for r in part]) for name in part[0].inputs}
        packed.append(InferRequest(id=str(i), inputs=inputs))
    return packed


def measure_intake(pipeline: Pipeline, *, rows_per_message: int = 1, seconds: float = 1.0) -> float:
    """Seconds one consumer process spends per message outside the model and AMQP: decode and check
    the body, prepare its rows, encode the reply (msgpack, as the client sends)."""
    requests = _packed_requests(pipeline, rows_per_message, 32)
    bodies = [encode_request(r.inputs, CONTENT_TYPE_MSGPACK, request_id=r.id) for r in requests]
    max_rows = max(rows_per_message, 1)
    outputs = [pipeline.run([pipeline.prepare(r, max_rows=max_rows)])[0] for r in requests]
    done = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or done == 0:
        for body, output in zip(bodies, outputs, strict=True):
            request = decode_request(body, CONTENT_TYPE_MSGPACK)
            pipeline.prepare(request, max_rows=max_rows)
            encode_reply(request.id, output, CONTENT_TYPE_MSGPACK, model_name=pipeline.name)
        done += len(bodies)
    return elapsed / done


@dataclasses.dataclass(frozen=True)
class CapacityPlan:
    """One pod's plan: how many consumer processes keep the device busy, and the values that follow.

    Attributes:
        calibration: the device's rows/s by batch size and the batch settings derived from them.
        intake_s_per_message: a consumer process's CPU seconds per message, AMQP included.
        processes: consumer processes per pod (``worker.processes``).
        on_cpu: the model runs on the CPU, so the processes share the cores with it.
        cpus: CPUs the plan may use (the processes are capped there when ``on_cpu``).
    """

    calibration: Calibration
    intake_s_per_message: float
    processes: int
    on_cpu: bool
    cpus: int

    @property
    def device_rows_per_s(self) -> float:
        return self.calibration.rows_per_s[self.calibration.max_batch]

    @property
    def intake_rows_per_s(self) -> float:
        """Rows/s one consumer process can take in and answer when the model costs it nothing."""
        return self.calibration.rows_per_message / self.intake_s_per_message

    @property
    def pod_rows_per_s(self) -> float:
        """What the pod sustains: the device, or the processes' intake, whichever is lower."""
        return min(self.device_rows_per_s, self.processes * self.intake_rows_per_s)

    @property
    def keda_target(self) -> int:
        """Messages per pod for KEDA: its rate times the accepted delay, above what the pod holds unacked."""
        c = self.calibration
        messages_per_s = self.pod_rows_per_s / c.rows_per_message
        return max(math.ceil(messages_per_s * c.queueing_delay_s), c.prefetch * self.processes + 1)

    def values_yaml(self, title: str) -> str:
        """The plan as a fragment of a Helm values file."""
        c = self.calibration
        return "\n".join(
            [
                f"# {title}",
                "worker:",
                f"  processes: {self.processes}",
                f"  maxBatch: {c.max_batch}",
                f"  prefetch: {c.prefetch}",
                *(["  intraOpThreads: 1"] if self.on_cpu and self.processes > 1 else []),
                "resources:",
                "  requests:",
                f'    cpu: "{self.processes}"',
                "autoscaling:",
                f"  targetQueueLength: {self.keda_target}",
            ]
        )


def plan_capacity(
    calibration: Calibration, intake_s_per_message: float, *, on_cpu: bool, cpus: int, max_processes: int = 64
) -> CapacityPlan:
    """The consumer processes that keep the device busy: device rows/s over one process's intake rows/s,
    rounded up; on the CPU, where the processes and the model share the cores, at most ``cpus``."""
    intake_rows_per_s = calibration.rows_per_message / intake_s_per_message
    device = calibration.rows_per_s[calibration.max_batch]
    processes = max(1, min(max_processes, math.ceil(device / intake_rows_per_s)))
    if on_cpu:
        processes = min(processes, cpus)
    return CapacityPlan(calibration, intake_s_per_message, processes, on_cpu, cpus)


def write_figures(path: Path, plan: CapacityPlan, *, model: str, providers: Sequence[str]) -> None:
    """Write ``plan``'s figures to the JSON file at ``path`` (read by ``producer plan``), keeping a
    ``cold_start`` section already there."""
    data: dict[str, Any] = {}
    if path.exists():
        with contextlib.suppress(ValueError):
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict) and "cold_start" in loaded:
                data["cold_start"] = loaded["cold_start"]
    c = plan.calibration
    data.update(
        {
            "model": model,
            "providers": list(providers),
            "rows_per_s": {str(b): r for b, r in sorted(c.rows_per_s.items())},
            "max_batch": c.max_batch,
            "prefetch": c.prefetch,
            "rows_per_message": c.rows_per_message,
            "processes": plan.processes,
            "intake_rows_per_s_per_process": plan.intake_rows_per_s,
            "pod_rows_per_s": plan.pod_rows_per_s,
            "keda_target": plan.keda_target,
        }
    )
    path.write_text(json.dumps(data, indent=2) + "\n")
