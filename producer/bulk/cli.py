"""``producer bulk``: run a bulk job from the command line, with a progress bar and a summary."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from producer.amqp import tls
from producer.amqp.logs import configure_cli
from producer.amqp.urls import broker_url
from producer.bulk.job import BulkJob
from producer.bulk.jsonl import parse_datatypes
from producer.bulk.options import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_ROWS_PER_MESSAGE,
    BulkOptions,
    BulkSummary,
    JobFailedError,
)
from producer.wire.errors import BrokerTlsError, InferenceError
from producer.wire.names import (
    CONTENT_TYPE_MSGPACK,
    CONTENT_TYPES,
    DEFAULT_AMQP_URL,
    DEFAULT_QUEUE,
    DEFAULT_RESULTS_TTL_S,
)

__all__ = ["add_bulk_parser", "run_bulk"]

EXIT_OK = 0
EXIT_ROWS_FAILED = 1
EXIT_JOB_FAILED = 2
EXIT_INTERRUPTED = 130

_EPILOG = """\
input rows (JSONL, one object per line):
  {"id": "r1", "text": "a sentence"}                  text models (input "text")
  {"id": "r2", "inputs": {"x": [0.5, 1.0, 2.0, 4.0]}}   tensor models: one row per input, no batch dimension
output rows (JSONL):
  {"id": "r1", "line": 1, "outputs": {"embedding": [...]}}
  {"id": "r2", "line": 2, "error": {"code": "wrong_shape", "message": "..."}}
Rerun the same command (or pass the same --job-id) to resume: rows already in OUTPUT are skipped
and replies that arrived meanwhile are collected. OUTPUT.job.json holds the job's secret (mode 0600;
keep it to resume): only replies tagged with it are written. One run per job id and per OUTPUT at a
time: a second one refuses. Exit status: 0 all rows ok, 1 some rows failed, 2 the job stopped or
another run of it is running (rerun to resume), 130 interrupted (rerun to resume).
"""


def add_bulk_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bulk`` subcommand to the ``producer`` CLI's subparsers and return its parser."""
    bulk: argparse.ArgumentParser = subparsers.add_parser(
        "bulk",
        help="stream a JSONL file of rows through the workers into a JSONL file (resumable)",
        description="Send every row of INPUT to the workers and write one result per row to OUTPUT.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bulk.add_argument("input", type=Path, metavar="INPUT", help="JSONL input file")
    bulk.add_argument("--output", "-o", type=Path, required=True, help="JSONL output file (appended; read to resume)")
    bulk.add_argument("--queue", default=DEFAULT_QUEUE, help="request queue (default %(default)s; not with --model)")
    bulk.add_argument(
        "--model",
        default=None,
        help="send to this model's route instead of --queue; the job is pinned to one version of it",
    )
    bulk.add_argument(
        "--version",
        default=None,
        help="with --model: the version to pin the job to (default: the version that answers its first request, "
        "recorded so reruns keep it)",
    )
    bulk.add_argument(
        "--job-id", default=None, help="names the job's results queue; the same id resumes (default: from --output)"
    )
    bulk.add_argument("--amqp-url", default=None, help=f"broker URL (env AMQP_URL; default {DEFAULT_AMQP_URL})")
    tls.add_arguments(bulk)
    bulk.add_argument(
        "--results-ttl-s",
        type=float,
        default=DEFAULT_RESULTS_TTL_S,
        help="the broker deletes the results queue after this many seconds unused, so late replies still "
        "find it until then (default %(default).0f: 24 h; keep it the same across runs of a job)",
    )
    bulk.add_argument(
        "--rows-per-message",
        type=int,
        default=DEFAULT_ROWS_PER_MESSAGE,
        help="rows packed into one request, at most the workers' --max-batch (default %(default)s)",
    )
    bulk.add_argument(
        "--max-in-flight",
        type=int,
        default=DEFAULT_MAX_IN_FLIGHT,
        help="requests outstanding at once (default %(default)s)",
    )
    bulk.add_argument(
        "--order",
        choices=("arrival", "input"),
        default="arrival",
        help="write rows as replies arrive, or in input order (default %(default)s)",
    )
    bulk.add_argument(
        "--content-type", choices=CONTENT_TYPES, default=CONTENT_TYPE_MSGPACK, help="request encoding (%(default)s)"
    )
    bulk.add_argument("--text-input", default="text", help='input name rows with "text" use (default %(default)s)')
    bulk.add_argument(
        "--datatype",
        action="append",
        default=[],
        metavar="[NAME=]TYPE",
        help="datatype of numeric inputs, for all (TYPE) or one input (NAME=TYPE); default FP32; repeatable",
    )
    bulk.add_argument("--no-progress", action="store_true", help="no progress bar")
    return bulk


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f} rows/s" if task.speed else "- rows/s", style="progress.data.speed")


class _ErrorsColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        errors = int(task.fields.get("errors", 0))
        return Text(f"{errors:,} errors", style="red" if errors else "dim")


class _Bar:
    """A rich progress bar as a :class:`producer.bulk.options.ProgressSink`."""

    def __init__(self, progress: Progress, description: str) -> None:
        self._progress = progress
        self._task = progress.add_task(description, total=None, errors=0)
        self._errors = 0

    def start(self, total_rows: int) -> None:
        self._progress.update(self._task, total=total_rows)

    def advance(self, rows: int, failed: int) -> None:
        self._errors += failed
        self._progress.update(self._task, advance=rows, errors=self._errors)


def _print_summary(summary: BulkSummary, output: Path, console: Console) -> None:
    console.print(
        f"job {summary.job_id}: {summary.written:,} rows written to {output} in {summary.elapsed_s:.1f} s "
        f"({summary.rows_per_s:,.0f} rows/s, {summary.messages:,} requests)"
    )
    if summary.model_version is not None:
        console.print(f"  pinned to model version {summary.model_version}")
    if summary.other_version:
        console.print(
            f"  [yellow]{summary.other_version:,} replies came from another version[/yellow]: the pinned version's "
            "queue was drained onto the route (see the warning)"
        )
    if summary.skipped:
        console.print(f"  {summary.skipped:,} rows were already in the output")
    if summary.collected:
        console.print(f"  {summary.collected:,} rows came from requests sent by an earlier run")
    if summary.forged:
        console.print(
            f"  [yellow]{summary.forged:,} replies were dropped[/yellow]: they answer no request of this job "
            "(forged, or sent to its results queue by mistake; see the warnings)"
        )
    if summary.splits:
        console.print(f"  {summary.splits:,} requests were split after an error reply to find the failing rows")
    if summary.failed_total:
        codes = ", ".join(f"{code} {n:,}" for code, n in summary.errors_by_code.most_common())
        console.print(f"  [red]{summary.failed_total:,} rows failed[/red] ({codes or 'in earlier runs'})")
    else:
        console.print("  all rows succeeded")


def run_bulk(args: argparse.Namespace) -> int:
    """Run ``producer bulk`` with parsed arguments; returns the exit status."""
    err = Console(stderr=True)
    configure_cli()  # the progress bar and the summary speak for the job; log events only for problems
    try:
        default_datatype, datatypes = parse_datatypes(args.datatype)
        options = BulkOptions(
            input_path=args.input,
            output_path=args.output,
            queue=args.queue,
            model=args.model,
            version=args.version,
            job_id=args.job_id,
            amqp_url=broker_url(url=args.amqp_url, url_file=args.amqp_url_file),
            tls=tls.options_from_args(args),
            results_ttl_s=args.results_ttl_s,
            rows_per_message=args.rows_per_message,
            max_in_flight=args.max_in_flight,
            order=args.order,
            content_type=args.content_type,
            text_input=args.text_input,
            default_datatype=default_datatype,
            datatypes=datatypes,
        )
    except (ValueError, BrokerTlsError) as e:
        err.print(f"producer bulk: {e}")
        return EXIT_JOB_FAILED
    if not options.input_path.is_file():
        err.print(f"producer bulk: no input file {options.input_path}")
        return EXIT_JOB_FAILED
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeRemainingColumn(),
        _ErrorsColumn(),
        console=err,
        disable=args.no_progress or not err.is_terminal,
    )
    job = BulkJob(options, _Bar(progress, options.resolved_job_id))
    resume_hint = f"rerun with --job-id {job.job_id} to resume"
    try:
        with progress:
            summary = asyncio.run(job.run())
    except KeyboardInterrupt:
        err.print(f"producer bulk: interrupted; {resume_hint}")
        return EXIT_INTERRUPTED
    except JobFailedError as e:
        err.print(f"producer bulk: {e}")
        return EXIT_JOB_FAILED
    except InferenceError as e:
        err.print(f"producer bulk: {e}; {resume_hint}")
        return EXIT_JOB_FAILED
    _print_summary(summary, options.output_path, Console(file=sys.stdout))
    return EXIT_ROWS_FAILED if summary.failed_total else EXIT_OK
