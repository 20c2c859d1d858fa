"""``worker``: serve a model from a RabbitMQ queue, or inspect one."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import structlog

from producer.errors import InferenceError
from worker import settings as settings_mod
from worker.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worker",
        description="Consume inference requests from RabbitMQ, run them in batches through ONNX Runtime, "
        "and reply to each request's reply_to.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="consume a queue and serve a model",
        description="Consume a request queue and serve a model. Every flag has an environment variable; "
        "flags win. Stops cleanly on SIGTERM/SIGINT (drain).",
    )
    settings_mod.add_arguments(run)
    inspect = commands.add_parser("inspect", help="print what the worker would do with a model")
    inspect.add_argument("model", type=Path, help="ONNX file or model folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            settings = settings_mod.from_args(args)
            configure_logging(log_format=settings.log_format, level=settings.log_level)
            from worker.consumer import Worker

            asyncio.run(Worker(settings).run())
            return 0
        if args.command == "inspect":
            return _inspect(args.model)
    except settings_mod.SettingsError as e:
        print(f"worker: invalid setting: {e}", file=sys.stderr)
        return 2
    except InferenceError as e:
        configure_logging()
        structlog.get_logger("worker").error("worker_failed", error=str(e))
        return 1
    return 2


def _inspect(model: Path) -> int:
    from worker.model import load_pipeline

    pipeline = load_pipeline(settings_mod.Settings(model=model, log_level="warning"))
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


if __name__ == "__main__":
    sys.exit(main())
