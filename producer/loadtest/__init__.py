"""Queue-native load generation for qinfer workers: profiles, payloads, runner, statistics, report.

The pure parts (:mod:`.profiles`, :mod:`.payloads`, :mod:`.stats`) hold no I/O; :mod:`.runner` talks to
RabbitMQ with aio-pika directly, for precise timing; :mod:`.report` writes JSON, Markdown, a PNG plot and
the raw samples. The CLI is ``producer load-test`` (:mod:`producer.loadtest.cli`).
"""

from __future__ import annotations

from producer.loadtest.payloads import PayloadSpec, build_bodies
from producer.loadtest.profiles import MODES, LoadTestConfigError, Profile, send_offsets
from producer.loadtest.runner import LoadRunner, LoadTestError, RunResult, Target
from producer.loadtest.stats import Sample, Summary, summarize

__all__ = [
    "MODES",
    "LoadRunner",
    "LoadTestConfigError",
    "LoadTestError",
    "PayloadSpec",
    "Profile",
    "RunResult",
    "Sample",
    "Summary",
    "Target",
    "build_bodies",
    "send_offsets",
    "summarize",
]
