"""``worker``: serve a model from a RabbitMQ queue, or inspect one."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import sys
from pathlib import Path

import structlog

from producer.wire.errors import InferenceError
from worker import settings as settings_mod
from worker import tracing
from worker.logs import configure_logging

_EXAMPLES = {
    "run": """\
examples:
  # serve the default text model from the queue "inference" on a local broker
  worker run
  # a tensor model, batches of up to 32 rows, waiting at most 2 ms to fill one
  worker run --model model.onnx --queue mlp --max-batch 32 --max-delay-ms 2
  # version 2 of model minilm with a tenth of its unpinned requests
  worker run --model-name minilm --model-version 2 --traffic-weight 10
""",
    "inspect": """\
examples:
  # the inputs and outputs requests must carry, and what the worker does with them
  worker inspect models/all-MiniLM-L6-v2
""",
    "calibrate": """\
examples:
  # throughput by batch size for the default model on this machine
  worker calibrate
  # a tensor model whose producers pack 16 rows per message
  worker calibrate model.onnx --rows-per-message 16
  # the figures as JSON, for producer plan
  worker calibrate --out calibration.json
""",
    "coldstart": """\
examples:
  # a fresh worker on the default model, median of 3 starts, added to calibrate's file
  worker coldstart --out calibration.json
  # a tensor model as the chart runs it
  worker coldstart model.onnx --runs 5 --worker-args='--max-batch 32 --prefetch 64'
""",
}


class _ExamplesFormatter(argparse.HelpFormatter):
    """Wraps the description as usual; prints the ``examples:`` epilog as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return text if text.startswith("examples:") else super()._fill_text(text, width, indent)


def version_line() -> str:
    """``worker 0.1.0 (onnxruntime 1.20.1)``: this package's version and ONNX Runtime's, from package metadata
    (neither is imported, so ``--version`` answers at once)."""
    ort = "not installed"
    for distribution in ("onnxruntime", "onnxruntime-gpu"):
        try:
            ort = importlib.metadata.version(distribution)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        own = importlib.metadata.version("qinfer")
    except importlib.metadata.PackageNotFoundError:
        own = "unknown"
    return f"worker {own} (onnxruntime {ort})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worker",
        description="Consume inference requests from RabbitMQ, run them in batches through ONNX Runtime, "
        "and reply to each request's reply_to.",
    )
    parser.add_argument("--version", action="version", version=version_line())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="consume a queue and serve a model",
        description="Consume a request queue and serve a model. Every flag has an environment variable; "
        "flags win. Stops cleanly on SIGTERM/SIGINT (drain).",
        epilog=_EXAMPLES["run"],
        formatter_class=_ExamplesFormatter,
    )
    settings_mod.add_arguments(run)
    inspect = commands.add_parser(
        "inspect",
        help="print what the worker would do with a model",
        epilog=_EXAMPLES["inspect"],
        formatter_class=_ExamplesFormatter,
    )
    inspect.add_argument("model", type=Path, help="ONNX file or model folder")
    calibrate = commands.add_parser(
        "calibrate",
        help="measure throughput by batch size here; suggest --max-batch, --prefetch and the KEDA target",
        description="Run the model in this process (no broker) on synthetic requests at each batch size, and "
        "derive --max-batch, --prefetch and the KEDA targetQueueLength from the measured throughput.",
        epilog=_EXAMPLES["calibrate"],
        formatter_class=_ExamplesFormatter,
    )
    calibrate.add_argument("model", type=Path, nargs="?", default=Path(settings_mod.DEFAULT_MODEL_PATH),
                           help="ONNX file or model folder (default: %(default)s)")  # fmt: skip
    calibrate.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128", help="rows per run to try")
    calibrate.add_argument("--rows-per-message", type=int, default=1, help="rows your producers put in a message")
    calibrate.add_argument("--queueing-delay-s", type=float, default=30.0,
                           help="how long a request may wait in the queue before KEDA adds a replica")  # fmt: skip
    calibrate.add_argument("--seconds-per-size", type=float, default=2.0, help="measuring time per batch size")
    calibrate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")
    calibrate.add_argument(
        "--broker-ms-per-message",
        type=float,
        default=0.4,
        help="CPU ms a consumer process spends per message on AMQP alone (receive, reply, confirm, ack); the "
        "worker measured 0.44 in all on a quorum queue with a near-zero model, a bare aio-pika echo consumer 0.42 "
        "(python -m bench.broker_bound --model affine prints both for your machine)",
    )
    calibrate.add_argument("--out", type=Path, default=None,
                           help="also write the figures to this JSON file (read by `producer plan`; a "
                           "cold_start section written by `worker coldstart` is kept)")  # fmt: skip
    coldstart = commands.add_parser(
        "coldstart",
        help="measure how long a fresh worker process takes to answer, phase by phase",
        description="Spawn `worker run` on a queue of its own, time process start -> imports done -> session "
        "created -> warmed -> consuming -> first reply, stop it with SIGTERM, and say which phase dominates. "
        "Needs a broker (AMQP_URL).",
        epilog=_EXAMPLES["coldstart"],
        formatter_class=_ExamplesFormatter,
    )
    coldstart.add_argument("model", type=Path, nargs="?", default=Path(settings_mod.DEFAULT_MODEL_PATH),
                           help="ONNX file or model folder (default: %(default)s)")  # fmt: skip
    coldstart.add_argument("--runs", type=int, default=3, help="cold starts to take the median of (default 3)")
    coldstart.add_argument("--amqp-url", default=None, help="broker URL (default: env AMQP_URL or the local one)")
    coldstart.add_argument("--out", type=Path, default=None,
                           help="write the figures as the cold_start section of this JSON file")  # fmt: skip
    coldstart.add_argument("--worker-args", default="",
                           help="more `worker run` flags: --worker-args='--max-batch 32 --device cpu'")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            settings = settings_mod.from_args(args)
            configure_logging(log_format=settings.log_format, level=settings.log_level)
            return _run(settings)
        if args.command == "inspect":
            return _inspect(args.model)
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "coldstart":
            return _coldstart(args)
    except (settings_mod.SettingsError, tracing.ConfigError) as e:
        print(f"worker: invalid setting: {e}", file=sys.stderr)
        return 2
    except InferenceError as e:
        configure_logging()
        structlog.get_logger("worker").error("worker_failed", error=str(e))
        return 1
    return 2


def _run(settings: settings_mod.Settings) -> int:
    """One worker in this process (``--processes 1``), or a supervisor of several consumer processes."""
    from worker.supervisor import CHILD_INDEX_ENV, Supervisor, resolve_processes

    processes = resolve_processes(settings)
    if processes == 1:
        from worker.service import Worker

        if CHILD_INDEX_ENV in os.environ:  # a supervisor's consumer process: say which in every line
            structlog.contextvars.bind_contextvars(child=int(os.environ[CHILD_INDEX_ENV]))
        provider = tracing.configure_from_env()  # each consumer process exports its own spans
        try:
            asyncio.run(Worker(settings).run())
        finally:
            tracing.shutdown(provider)
        return 0
    return asyncio.run(Supervisor(settings, processes).run())


def _inspect(model: Path) -> int:
    from worker.pipelines.tensor import load_pipeline

    pipeline = load_pipeline(settings_mod.Settings(model=model).model_config)
    print(f"model:     {pipeline.name} (version {pipeline.version})")
    print(f"pipeline:  {type(pipeline).__name__}")
    print(f"providers: {', '.join(pipeline.providers)}")
    print("inputs (what requests carry):")
    for spec in pipeline.inputs.values():
        print(f"  {spec.describe()}")
    print("outputs (what replies carry):")
    for spec in pipeline.outputs.values():
        print(f"  {spec.describe()}")
    print("what the worker does:")
    for step, text in enumerate(pipeline.describe(), 1):
        print(f"  {step}. {text}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from worker.calibrate import calibrate
    from worker.pipelines.tensor import load_pipeline

    console = Console()
    sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    pipeline = load_pipeline(settings_mod.Settings(model=args.model, device=args.device).model_config)
    console.print(f"calibrating {pipeline.name} on {', '.join(pipeline.providers)}: batch sizes {sizes}")
    result = calibrate(
        pipeline,
        sizes,
        rows_per_message=args.rows_per_message,
        queueing_delay_s=args.queueing_delay_s,
        seconds_per_size=args.seconds_per_size,
        progress=lambda b, r: console.print(f"  batch {b:>5}: {r:>10.1f} rows/s"),
    )
    table = Table(title="batch settings (in-process throughput: the ceiling through the broker)")
    table.add_column("setting")
    table.add_column("value", justify="right")
    table.add_column("why")
    table.add_row("--max-batch", str(result.max_batch), "smallest batch within 5 % of the best rows/s")
    table.add_row("--prefetch", str(result.prefetch), "two batches of messages, so the next batch is waiting")
    console.print(table)
    from worker.calibrate import measure_intake, plan_capacity
    from worker.supervisor import available_cpus

    codec_s = measure_intake(pipeline, rows_per_message=args.rows_per_message, seconds=min(args.seconds_per_size, 1.0))
    on_cpu = pipeline.providers[0] == "CPUExecutionProvider"
    plan = plan_capacity(result, codec_s + args.broker_ms_per_message / 1000, on_cpu=on_cpu, cpus=available_cpus())
    capacity = Table(title="capacity plan for one pod on this hardware")
    capacity.add_column("figure")
    capacity.add_column("value", justify="right")
    capacity.add_column("how")
    capacity.add_row(
        "device rows/s", f"{plan.device_rows_per_s:.0f}", f"in process, at the best batch ({result.max_batch})"
    )
    capacity.add_row(
        "intake rows/s per process",
        f"{plan.intake_rows_per_s:.0f}",
        f"{args.rows_per_message} row(s) per message; {codec_s * 1000:.3f} ms decode+prepare+encode measured "
        f"+ {args.broker_ms_per_message:g} ms AMQP (--broker-ms-per-message)",
    )
    capacity.add_row(
        "processes per pod",
        str(plan.processes),
        "device rows/s / intake rows/s per process, rounded up"
        + (f"; the model shares the {plan.cpus} CPU(s) here, so at most that" if on_cpu else ""),
    )
    capacity.add_row("pod rows/s", f"{plan.pod_rows_per_s:.0f}", "the lower of the device and the processes' intake")
    capacity.add_row(
        "targetQueueLength",
        str(plan.keda_target),
        f"pod messages/s x {result.queueing_delay_s:g} s, above prefetch x processes "
        f"({result.prefetch * plan.processes})",
    )
    console.print(capacity)
    console.print("values to paste into your values file:")
    print(plan.values_yaml(f"worker calibrate: {pipeline.name} on {pipeline.providers[0]}"))
    if args.out is not None:
        from worker.calibrate import write_figures

        write_figures(args.out, plan, model=pipeline.name, providers=pipeline.providers)
        console.print(f"figures written to {args.out} (add the cold start with `worker coldstart --out {args.out}`)")
    return 0


def _coldstart(args: argparse.Namespace) -> int:
    import json
    import shlex

    from producer.wire.names import DEFAULT_AMQP_URL
    from worker.calibrate import synthetic_requests
    from worker.coldstart import ColdStartError, measure_once, merge_into, summarize
    from worker.pipelines.tensor import load_pipeline

    if args.runs < 1:
        print("worker coldstart: --runs must be at least 1", file=sys.stderr)
        return 2
    configure_logging(log_format="console", level="warning")
    worker_args = shlex.split(args.worker_args)
    url = args.amqp_url or os.environ.get("AMQP_URL") or DEFAULT_AMQP_URL
    # The request is shaped for the model; built here, before any measured start.
    pipeline = load_pipeline(settings_mod.Settings(model=args.model, device="cpu", log_level="warning").model_config)
    request = synthetic_requests(pipeline, 1)[0]
    inputs = {k: (v.tolist() if v.dtype == object else v) for k, v in request.inputs.items()}
    del pipeline
    runs = []
    for i in range(args.runs):
        try:
            run = asyncio.run(measure_once(args.model, inputs, amqp_url=url, extra_args=worker_args))
        except ColdStartError as e:
            print(f"worker coldstart: {e}", file=sys.stderr)
            return 1
        runs.append(run)
        print(
            f"run {i + 1}: "
            + ", ".join(f"{k} {v:.3f} s" for k, v in run.items())
            + f"; total {sum(run.values()):.3f} s"
        )
    summary = {"model": str(args.model), "worker_args": worker_args, **summarize(runs)}
    median = summary["median_s"]
    print(f"cold start of {args.model} (median of {args.runs}): {summary['total_s']:.3f} s to the first reply")
    for name, value in median.items():
        print(f"  {name:<24} {value:8.3f} s  {100 * value / summary['total_s']:5.1f} %")
    print(f"dominated by {summary['dominant']} ({100 * summary['dominant_share']:.0f} %)")
    if args.out is not None:
        merge_into(args.out, summary)
        print(f"cold_start written to {args.out}")
    else:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
