"""``worker`` with a test-only fault: the process aborts when a request carries a marker value.

Runs exactly like ``worker run`` (same CLI, same settings), except that the loaded pipeline is
wrapped: a batch holding ``CHAOS_CRASH_ON`` anywhere in its inputs calls :func:`os.abort` before
the model runs, as a segfaulting kernel or an out-of-memory kill would. Nothing in the ``worker``
package knows about it: this module, used only by the fault-injection tests, is the hook.

    CHAOS_CRASH_ON=666 python -m tests.chaos.crashing_worker run --model ... --queue ...
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

import worker.runner
from producer.wire.protocol import InferRequest
from worker.cli import main
from worker.pipelines.config import ModelConfig
from worker.pipelines.session import Pipeline
from worker.pipelines.tensor import load_pipeline

CRASH_ENV = "CHAOS_CRASH_ON"


class CrashingPipeline:
    """Delegates to a real pipeline; aborts the process on a batch that holds ``crash_on``."""

    def __init__(self, inner: Pipeline, crash_on: float) -> None:
        self._inner = inner
        self._crash_on = crash_on

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def run(self, requests: Sequence[InferRequest]) -> Any:
        for request in requests:
            for array in request.inputs.values():
                if array.dtype.kind in "fiu" and bool(np.any(array == self._crash_on)):
                    os.abort()
        return self._inner.run(requests)


def _load(config: ModelConfig) -> Pipeline:
    pipeline = load_pipeline(config)
    crash_on = os.environ.get(CRASH_ENV)
    return pipeline if crash_on is None else CrashingPipeline(pipeline, float(crash_on))  # type: ignore[return-value]


if __name__ == "__main__":
    worker.runner.load_pipeline = _load  # type: ignore[assignment]
    sys.exit(main(sys.argv[1:]))
