"""``producer load-test``: offer a load profile to a request queue and write a report.

Wired into ``producer`` by :func:`add_loadtest_parser` and :func:`run_loadtest`.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from pathlib import Path

from producer.amqp import tls
from producer.amqp.urls import broker_url, redact_argv, redact_url
from producer.loadtest.payloads import PayloadSpec, build_bodies
from producer.loadtest.profiles import MODES, LoadTestConfigError, Profile
from producer.loadtest.runner import LoadRunner, LoadTestError, Target
from producer.loadtest.stats import summarize
from producer.wire.errors import BrokerTlsError
from producer.wire.names import CONTENT_TYPE_MSGPACK, CONTENT_TYPES, DEFAULT_AMQP_URL, DEFAULT_QUEUE

_DEFAULTS = Profile()


def _dims(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of dimensions such as 16 or 3,224,224") from None


def add_loadtest_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``load-test`` subcommand to ``producer``'s subparsers and return its parser."""
    p = subparsers.add_parser(
        "load-test",
        help="offer a load profile to a queue and write a report (JSON, Markdown, plot)",
        description="Publish requests on a schedule (constant, Poisson, burst) or at a fixed concurrency (closed), "
        "collect the replies over direct reply-to, and write a report: throughput, latency percentiles, latency "
        "by stage (from each reply's parameters.timing), batch sizes, errors, queue depth, and a plot. "
        "The default profile is a burst: 10/s, 150/s for 4 s from 5 s, then 10/s, 25 s in all.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    target = p.add_argument_group("target")
    target.add_argument("--amqp-url", default=None, help=f"broker URL (default: env AMQP_URL or {DEFAULT_AMQP_URL})")
    tls.add_arguments(target)
    target.add_argument("--queue", default=DEFAULT_QUEUE, help="request queue (must exist: a worker declares it)")
    target.add_argument("--purge", action="store_true", help="empty the queue before starting")
    target.add_argument("--wait-consumers", type=int, default=0, help="wait until the queue has this many consumers")
    target.add_argument("--wait-timeout-s", type=float, default=120.0, help="how long to wait for them")
    target.add_argument(
        "--management-url",
        default=None,
        help="RabbitMQ management API (http://user:pass@host:15672) for queue depth incl. unacked; "
        "default: passive queue declare (ready messages, no statistics delay)",
    )
    load = p.add_argument_group("profile")
    load.add_argument("--mode", choices=MODES, default=_DEFAULTS.mode, help="how to offer the load")
    load.add_argument("--rate-per-s", type=float, default=_DEFAULTS.rate_per_s, help="rate (burst: before and after)")
    load.add_argument("--burst-rate-per-s", type=float, default=_DEFAULTS.burst_rate_per_s, help="rate in the burst")
    load.add_argument("--burst-start-s", type=float, default=_DEFAULTS.burst_start_s, help="when the burst starts")
    load.add_argument("--burst-duration-s", type=float, default=_DEFAULTS.burst_duration_s, help="burst length")
    load.add_argument("--concurrency", type=int, default=_DEFAULTS.concurrency, help="in flight (closed mode)")
    load.add_argument("--duration-s", type=float, default=_DEFAULTS.duration_s, help="stop sending after this long")
    load.add_argument("--max-requests", type=int, default=None, help="stop sending after this many requests")
    load.add_argument("--timeout-s", type=float, default=30.0, help="per-request deadline (0: none)")
    load.add_argument("--drain-timeout-s", type=float, default=30.0, help="wait this long for replies after sending")
    load.add_argument("--seed", type=int, default=0, help="seed of Poisson arrivals, texts and tensors")
    payload = p.add_argument_group("payload")
    payload.add_argument("--payload", choices=("text", "tensor"), default="text", help="what requests carry")
    payload.add_argument("--rows", type=int, default=1, help="rows per request")
    payload.add_argument("--input-name", default="", help="input name (default: text for text, x for tensor)")
    payload.add_argument("--datatype", default="FP32", help="tensor datatype (OIP name)")
    payload.add_argument("--dims", type=_dims, default=(16,), help="dimensions of one tensor row, e.g. 16 or 3,32,32")
    payload.add_argument("--content-type", choices=CONTENT_TYPES, default=CONTENT_TYPE_MSGPACK, help="body encoding")
    payload.add_argument(
        "--coalesce-rows",
        type=int,
        default=1,
        help="pack concurrent requests into messages of up to this many rows while earlier publishes await "
        "their confirms, as producer.Client(coalesce_rows=N) does (1: every request its own message)",
    )
    output = p.add_argument_group("report")
    output.add_argument("--out", type=Path, default=None, help="report folder (default: reports/loadtest-<time>)")
    output.add_argument("--label", default="", help="a line describing the setup, recorded in the report")
    output.add_argument("--bin-s", type=float, default=1.0, help="window of the per-window series and the plot")
    output.add_argument("--depth-interval-s", type=float, default=0.25, help="how often to read the queue depth")
    output.add_argument("--no-progress", action="store_true", help="no live view (it is off anyway without a TTY)")
    return p


def run_loadtest(args: argparse.Namespace) -> int:
    """Run ``producer load-test`` with parsed arguments; returns the exit status.

    0: the report was written and at least one request was answered; 1: the run failed or nothing was
    answered; 2: an option is invalid.
    """
    from producer.loadtest.progress import LiveView
    from producer.loadtest.report import ReportContext, default_folder, write_report

    try:
        url = broker_url(url=args.amqp_url, url_file=args.amqp_url_file)
        options = tls.options_from_args(args)
    except (ValueError, BrokerTlsError) as e:
        print(f"producer load-test: {e}", file=sys.stderr)
        return 2
    try:
        profile = Profile(
            mode=args.mode,
            rate_per_s=args.rate_per_s,
            burst_rate_per_s=args.burst_rate_per_s,
            burst_start_s=args.burst_start_s,
            burst_duration_s=args.burst_duration_s,
            concurrency=args.concurrency,
            duration_s=args.duration_s,
            max_requests=args.max_requests,
            seed=args.seed,
        )
        spec = PayloadSpec(
            kind=args.payload,
            rows=args.rows,
            input_name=args.input_name,
            datatype=args.datatype,
            dims=args.dims if args.payload == "tensor" else (),
            content_type=args.content_type,
            seed=args.seed,
        )
        if args.bin_s <= 0 or args.depth_interval_s <= 0:
            raise LoadTestConfigError("--bin-s and --depth-interval-s must be positive")
        if args.timeout_s < 0 or args.drain_timeout_s < 0:
            raise LoadTestConfigError("--timeout-s and --drain-timeout-s must be 0 or more")
        if args.coalesce_rows < 1:
            raise LoadTestConfigError("--coalesce-rows must be at least 1 (1 turns packing off)")
    except LoadTestConfigError as e:
        print(f"producer load-test: {e}", file=sys.stderr)
        return 2
    target = Target(
        amqp_url=url,
        tls=options,
        queue=args.queue,
        timeout_s=args.timeout_s,
        drain_timeout_s=args.drain_timeout_s,
        management_url=args.management_url,
        depth_interval_s=args.depth_interval_s,
        wait_consumers=args.wait_consumers,
        wait_timeout_s=args.wait_timeout_s,
        purge=args.purge,
    )
    folder = args.out or default_folder()
    title = f"load test on {args.queue!r}: {profile.describe()}"
    print(f"producer load-test: {title}; {spec.describe()}", file=sys.stderr)
    with LiveView(title) as view:
        runner = LoadRunner(
            target,
            profile,
            build_bodies(spec),
            content_type=spec.content_type,
            rows=spec.rows,
            coalesce_rows=args.coalesce_rows,
            on_progress=None if args.no_progress else view.update,
        )
        try:
            result = asyncio.run(runner.run(handle_sigint=True))
        except LoadTestError as e:
            print(f"producer load-test: {e}", file=sys.stderr)
            return 1
    window = profile.burst_window_s
    summary = summarize(
        result.samples,
        send_duration_s=result.send_duration_s,
        depth=result.depth,
        bin_s=args.bin_s,
        settled_after_s=window[1] if window else None,
    )
    context = ReportContext(
        queue=args.queue,
        amqp_url=redact_url(url),
        depth_source="management API" if args.management_url else "passive queue declare",
        label=args.label,
        command="producer " + shlex.join(redact_argv(sys.argv[1:])) if sys.argv[1:2] == ["load-test"] else "",
    )
    paths = write_report(folder, summary=summary, result=result, profile=profile, payload=spec, context=context)
    lat = summary.latency
    latency = f"latency p50 {lat.p50_ms:.1f} ms, p99 {lat.p99_ms:.1f} ms, max {lat.max_ms:.1f} ms" if lat else ""
    print(
        f"sent {summary.sent}, ok {summary.ok}, errors {sum(summary.errors.values())}; "
        f"throughput {summary.throughput_per_s:.1f} req/s (peak {summary.peak_throughput_per_s:.0f}/s); "
        + (latency or "no replies")
    )
    print(f"report: {paths['markdown']}")
    if "plot" in paths:
        print(f"plot:   {paths['plot']}")
    return 0 if summary.ok > 0 else 1
