"""Running batches on the model: inline on the event loop, or in the model thread, decided once at warm-up.

Handing a batch to the model thread and back costs about 0.1 ms of event-loop time idle, and up to
1 ms at saturation on two cores, when the model thread waits for the GIL the busy loop holds. A model
whose warm-up (one row, then a full batch) takes less than :data:`INLINE_COMPUTE_S` runs inline:
blocking the loop that briefly costs less than the hand-off. Anything slower runs in the model thread
while the loop receives. A first pass already :data:`CLEARLY_SLOW` times over that budget decides
"model thread" by itself: the second, timed pass could not change the answer, so a slow model's
cold start no longer pays for it (``worker coldstart`` measures the phases).

Called by the worker (warm-up) and the scheduler (runs); calls the pipeline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from worker.batching import Arrays, run_isolating
from worker.pipelines.tensor import Pipeline, load_pipeline
from worker.settings import Settings

INLINE_COMPUTE_S = 0.001
CLEARLY_SLOW = 20
"""A first warm-up pass (allocation and kernel choice included) this many times over
:data:`INLINE_COMPUTE_S` decides the model thread without a second, timed pass."""

RunResult = tuple[list[Arrays | Exception], float, float]
"""Per-item results (outputs or the exception that item raised), start (monotonic), duration (s)."""


def timed_run(run: Callable[[Sequence[Any]], list[Arrays]], prepared: Sequence[Any]) -> RunResult:
    """Run a batch with failure isolation (see :func:`run_isolating`), where it runs (loop or model thread)."""
    started = time.monotonic()
    results = run_isolating(run, prepared)
    return results, started, time.monotonic() - started


def _timed_warm_up(pipeline: Pipeline, max_rows: int) -> float:
    """Seconds one warm-up pass (one row, then a full batch) takes, measured where it runs."""
    started = time.perf_counter()
    pipeline.warm_up(max_rows)
    return time.perf_counter() - started


class ModelRunner:
    """Owns the model thread and the inline-or-thread decision."""

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
        self.inline = False
        self.warm_up_s = 0.0
        self.one_thread = False
        self.load_s = 0.0
        self.first_warm_up_s = 0.0
        self.warm_up_passes = 0
        self.loaded_at = 0.0
        self.warmed_at = 0.0

    async def warm_up(self, settings: Settings, pipeline: Pipeline | None) -> Pipeline:
        """Load the model if not given, warm it up, time it, and decide where it runs.

        Returns the pipeline to serve: a model cheap enough to run inline that this worker loaded
        itself on the CPU is loaded again with one ONNX Runtime thread (see ``one_thread``).
        """
        loaded_here = pipeline is None
        if pipeline is None:
            started = time.perf_counter()
            pipeline = await asyncio.to_thread(load_pipeline, settings.model_config)
            self.load_s = time.perf_counter() - started
        self.loaded_at = time.time()
        loop = asyncio.get_running_loop()
        self.first_warm_up_s = await loop.run_in_executor(self._executor, _timed_warm_up, pipeline, settings.max_batch)
        self.warm_up_passes = 1
        if self.first_warm_up_s >= CLEARLY_SLOW * INLINE_COMPUTE_S:
            self.warm_up_s = self.first_warm_up_s  # an upper bound, far above the budget either way
        else:
            # Timed on its second pass (the first pays for allocation and kernel choice), with nothing
            # else running: the model's own cost, decided once.
            self.warm_up_s = await loop.run_in_executor(self._executor, _timed_warm_up, pipeline, settings.max_batch)
            self.warm_up_passes = 2
        self.inline = self.warm_up_s < INLINE_COMPUTE_S
        on_cpu = pipeline.providers[0] == "CPUExecutionProvider"
        self.one_thread = self.inline and loaded_here and on_cpu and settings.intra_op_threads == 0
        if self.one_thread:
            # A model this cheap gains nothing from ONNX Runtime's thread pool and pays, on every
            # run, for waking a pool thread that competes with the loop for the cores: one thread.
            pipeline = await asyncio.to_thread(
                load_pipeline, dataclasses.replace(settings.model_config, intra_op_threads=1)
            )
            await loop.run_in_executor(self._executor, pipeline.warm_up, settings.max_batch)
        self.warmed_at = time.time()
        return pipeline

    def run_inline(self, run: Callable[[Sequence[Any]], list[Arrays]], prepared: Sequence[Any]) -> RunResult:
        """Run a batch on the calling (event-loop) thread."""
        return timed_run(run, prepared)

    def submit(
        self, run: Callable[[Sequence[Any]], list[Arrays]], prepared: Sequence[Any]
    ) -> asyncio.Future[RunResult]:
        """Queue a batch for the model thread."""
        return asyncio.get_running_loop().run_in_executor(self._executor, timed_run, run, prepared)

    def shutdown(self) -> None:
        """Stop the model thread once its current run ends; queued runs are dropped."""
        self._executor.shutdown(wait=False, cancel_futures=True)
