"""What a bulk job is asked to do and what it reports: options, summary, progress, and the job's errors.

Owns :class:`BulkOptions` (checked at construction, each message naming the CLI flag), :class:`BulkSummary`,
the :class:`ProgressSink` protocol and :class:`JobFailedError` / :class:`JobLockedError`. Used by every part of a
bulk job (:mod:`producer.bulk.job`, :mod:`.ledger`, :mod:`.replies`, :mod:`.state`) and by ``producer bulk``
(:mod:`producer.bulk.cli`). Pure: no I/O.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Protocol

from producer.amqp.tls import TlsOptions
from producer.wire.errors import InferenceError
from producer.wire.names import (
    CONTENT_TYPE_MSGPACK,
    DEFAULT_AMQP_URL,
    DEFAULT_MAX_BATCH,
    DEFAULT_QUEUE,
    DEFAULT_RESULTS_TTL_S,
    check_route_name,
)

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_ROWS_PER_MESSAGE",
    "BulkOptions",
    "BulkSummary",
    "JobFailedError",
    "JobLockedError",
    "Order",
    "ProgressSink",
    "default_job_id",
]

DEFAULT_ROWS_PER_MESSAGE = DEFAULT_MAX_BATCH  # measured: bench/bulk_rows_per_message.py; the default worker --max-batch
DEFAULT_MAX_IN_FLIGHT = 64
Order = Literal["arrival", "input"]

_JOB_ID = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class JobFailedError(InferenceError):
    """Raised when a bulk job cannot go on (broker gone, queue missing); rerun it to resume."""


class JobLockedError(JobFailedError):
    """Raised when another run of the same job, or another job writing the same output, is running."""


def default_job_id(output_path: Path) -> str:
    """A job id derived from the output file's absolute path, so a plain rerun resumes the job."""
    digest = hashlib.sha1(str(output_path.resolve()).encode()).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", output_path.stem)[:60] or "job"
    return f"{stem}-{digest}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BulkOptions:
    """What one bulk job does.

    Args:
        input_path: JSONL input (see :mod:`producer.bulk.jsonl` for the row format).
        output_path: JSONL output; appended to, and read first to resume.
        queue: request queue the workers consume (not used with ``model``).
        model: send to this model's route instead of ``queue``; the job is pinned to one version.
        version: the version of ``model`` to pin the job to (default: the first reply's version).
        job_id: names the results queue; the same id resumes the job (default: from ``output_path``).
        amqp_url: RabbitMQ URL.
        tls: for an ``amqps://`` URL: CA bundle, client certificate and key (default: the system's CAs).
        results_ttl_s: the results queue is deleted by the broker after this many seconds unused
            (``x-expires``; default 24 h). Keep it the same across the runs of a job.
        rows_per_message: rows packed into one request (at most the workers' ``--max-batch``).
        max_in_flight: packed requests outstanding at once (the flow-control window).
        order: ``arrival`` writes rows as replies arrive; ``input`` writes them in input order.
        content_type: request encoding (msgpack is the fast path).
        text_input: input name for rows with ``"text"``.
        default_datatype: datatype of numeric ``inputs`` values (OIP name).
        datatypes: per-input datatype overrides.
    """

    input_path: Path
    output_path: Path
    queue: str = DEFAULT_QUEUE
    model: str | None = None
    version: str | None = None
    job_id: str | None = None
    amqp_url: str = dataclasses.field(default=DEFAULT_AMQP_URL, repr=False)
    tls: TlsOptions | None = None
    results_ttl_s: float = DEFAULT_RESULTS_TTL_S
    rows_per_message: int = DEFAULT_ROWS_PER_MESSAGE
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    order: Order = "arrival"
    content_type: str = CONTENT_TYPE_MSGPACK
    text_input: str = "text"
    default_datatype: str = "FP32"
    datatypes: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rows_per_message < 1:
            raise ValueError(f"--rows-per-message must be at least 1, got {self.rows_per_message}")
        if self.max_in_flight < 1:
            raise ValueError(f"--max-in-flight must be at least 1, got {self.max_in_flight}")
        if self.results_ttl_s < 1:
            raise ValueError(f"--results-ttl-s must be at least 1, got {self.results_ttl_s}")
        if self.version is not None and self.model is None:
            raise ValueError(f"--version {self.version} pins a version of a model: pass --model too")
        for kind, name in (("--model", self.model), ("--version", self.version)):
            if name is not None:
                check_route_name(kind, name)
        if self.job_id is not None and not _JOB_ID.match(self.job_id):
            raise ValueError(f"--job-id {self.job_id!r}: use 1-200 letters, digits, '.', '_' or '-'")

    @property
    def resolved_job_id(self) -> str:
        """``job_id``, or the one derived from the output path."""
        return self.job_id or default_job_id(self.output_path)


@dataclasses.dataclass
class BulkSummary:
    """What a run did. Counts are rows unless named otherwise."""

    job_id: str
    input_rows: int = 0
    skipped: int = 0
    """Rows already in the output when the run started."""
    written: int = 0
    """Rows this run added to the output (results and errors)."""
    failed: int = 0
    """Rows this run reported as errors."""
    failed_before: int = 0
    """Error rows already in the output when the run started."""
    collected: int = 0
    """Rows answered by requests an earlier run sent (collected from the results queue)."""
    forged: int = 0
    """Replies (messages, not rows) dropped unwritten: nothing proved they answer a request of this job."""
    messages: int = 0
    """Requests published (splits included)."""
    splits: int = 0
    """Multi-row requests split in halves after an error reply."""
    model_version: str | None = None
    """The version the job is pinned to (with a model)."""
    other_version: int = 0
    """Replies (messages) from another version than the pinned one: its queue was drained onto the route."""
    errors_by_code: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    elapsed_s: float = 0.0

    @property
    def failed_total(self) -> int:
        """Error rows in the whole output file."""
        return self.failed + self.failed_before

    @property
    def rows_per_s(self) -> float:
        """Rows written per second of this run."""
        return self.written / self.elapsed_s if self.elapsed_s > 0 else 0.0


class ProgressSink(Protocol):
    """Receives progress; the CLI draws a progress bar from it."""

    def start(self, total_rows: int) -> None:
        """The run will write about ``total_rows`` rows."""

    def advance(self, rows: int, failed: int) -> None:
        """``rows`` more rows were written, ``failed`` of them errors."""
