"""CLI conventions: an exit status per outcome class, ``--version`` from package metadata, examples in every --help."""

from __future__ import annotations

import argparse
import importlib.metadata
import shlex
import subprocess
import sys

import aio_pika.exceptions
import aiormq.exceptions
import pytest

from producer.cli import build_parser as producer_parser
from producer.cli_help import EXAMPLES
from producer.exit_codes import ExitCode, exit_code_for
from producer.wire.errors import (
    BrokerTlsError,
    ConnectionLostError,
    ErrorReplyError,
    ProtocolError,
    PublishRefusedError,
    RequestTimeoutError,
)
from worker.cli import build_parser as worker_parser
from worker.cli import version_line


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ErrorReplyError("r", "unknown_input", "no input 'z'"), ExitCode.ERROR_REPLY),
        (RequestTimeoutError("no reply"), ExitCode.TIMEOUT),
        (TimeoutError(), ExitCode.TIMEOUT),
        (PublishRefusedError("no queue"), ExitCode.UNROUTABLE),
        (aio_pika.exceptions.DeliveryError(None, None), ExitCode.UNROUTABLE),  # type: ignore[arg-type]
        (aiormq.exceptions.ChannelNotFoundEntity("no exchange"), ExitCode.UNROUTABLE),
        (ConnectionLostError("closed"), ExitCode.CONNECTION),
        (BrokerTlsError("unknown CA"), ExitCode.CONNECTION),
        (ConnectionRefusedError(111, "refused"), ExitCode.CONNECTION),
        (aiormq.exceptions.ProbableAuthenticationError("ACCESS_REFUSED"), ExitCode.CONNECTION),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED),
    ],
)
def test_each_outcome_class_has_its_exit_status(error: BaseException, code: ExitCode) -> None:
    assert exit_code_for(error) is code


def test_an_exception_no_class_covers_is_not_given_a_status() -> None:
    with pytest.raises(TypeError):
        exit_code_for(ProtocolError("bad_encoding", "a bug, not an outcome"))


def test_the_exit_statuses_are_distinct_and_the_readme_lists_each() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert len({int(c) for c in ExitCode}) == len(ExitCode)
    for code in ExitCode:
        assert f"| {int(code)} |" in readme, f"README's exit code table lacks {int(code)} ({code.name})"


def test_producer_version_comes_from_the_package_metadata() -> None:
    done = subprocess.run([sys.executable, "-m", "producer.cli", "--version"], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, f"producer {importlib.metadata.version('qinfer')}\n")


def test_worker_version_names_onnx_runtime_too() -> None:
    import onnxruntime

    done = subprocess.run([sys.executable, "-m", "worker.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout == f"worker {importlib.metadata.version('qinfer')} (onnxruntime {onnxruntime.__version__})\n"
    assert done.stdout.strip() == version_line()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_producer_subcommand_shows_examples_that_parse() -> None:
    parser = producer_parser()
    commands = _subcommands(parser)
    assert set(commands) == set(EXAMPLES)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "examples:\n" in text, name
        for what, command in EXAMPLES[name]:
            assert f"  # {what}\n  {command}\n" in text, name  # printed as written, not re-wrapped
            argv = shlex.split(command.split(" < ")[0].split(" > ")[0])[1:]
            parser.parse_args(argv)  # exits 2 (SystemExit) on an example that does not parse


def test_every_worker_subcommand_shows_examples_that_parse() -> None:
    parser = worker_parser()
    for name, sub in _subcommands(parser).items():
        text = sub.format_help()
        assert "examples:\n" in text, name
        lines = text.split("examples:\n", 1)[1].splitlines()
        commands = [line.strip() for line in lines if line.strip().startswith("worker ")]
        assert commands, name
        for command in commands:
            parser.parse_args(shlex.split(command)[1:])
