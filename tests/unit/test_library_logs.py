"""The library's logging: ``qinfer.*`` stdlib loggers, silent by default, key/values for whoever configures them."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest
import structlog

from producer.amqp.logs import ROOT_LOGGER, add_library_fields, format_event, get_logger
from tests.support.logs import library_events


def test_library_loggers_are_stdlib_loggers_under_qinfer_with_a_null_handler() -> None:
    assert get_logger("client").logger is logging.getLogger("qinfer.client")
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger(ROOT_LOGGER).handlers)


def test_a_warning_reaches_nobody_when_the_application_configured_nothing() -> None:
    # Without the NullHandler, logging.lastResort would print a warning to stderr.
    code = "from producer.amqp.logs import get_logger; get_logger('tls').warning('tls_hostname_not_verified', a=1)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (done.stdout, done.stderr) == ("", "")


def test_an_event_reads_as_key_values_and_carries_its_fields(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="qinfer"):
        get_logger("client").debug("client_connected", queue="inference", rows=3, why="two words")
    [record] = caplog.records
    assert record.name == "qinfer.client"
    assert record.getMessage() == "client_connected queue=inference rows=3 why='two words'"
    assert library_events(caplog) == [
        {"event": "client_connected", "log_level": "debug", "logger": "qinfer.client", "queue": "inference",
         "rows": 3, "why": "two words"},
    ]  # fmt: skip


def test_a_disabled_level_formats_nothing(caplog: pytest.LogCaptureFixture) -> None:
    class Loud:
        def __repr__(self) -> str:
            raise AssertionError("formatted although the level is off")

    with caplog.at_level(logging.WARNING, logger="qinfer"):
        get_logger("client").debug("client_late_reply", value=Loud())
    assert caplog.records == []


def test_format_event_quotes_what_would_be_ambiguous() -> None:
    assert format_event("e", {"a": "", "b": "x=y", "c": None, "d": "plain"}) == "e a='' b='x=y' c=None d=plain"


def test_structlog_renders_a_library_event_with_its_fields_as_keys() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[add_library_fields, structlog.processors.add_log_level],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    logger = logging.getLogger("qinfer.test-render")
    logger.addHandler(handler)
    try:
        get_logger("test-render").warning("route_weight_set", model="m", weight=10)
    finally:
        logger.removeHandler(handler)
    assert json.loads(stream.getvalue()) == {
        "event": "route_weight_set",
        "level": "warning",
        "model": "m",
        "weight": 10,
    }


def test_the_producer_cli_prints_library_warnings_as_key_values_on_stderr() -> None:
    code = (
        "from producer.amqp.logs import configure_cli, get_logger; configure_cli(); "
        "get_logger('bulk').info('bulk_start', job_id='j'); get_logger('bulk').warning('bulk_bad_reply', job_id='j')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == ""
    [line] = done.stderr.splitlines()  # info is below the CLI's level
    assert "bulk_bad_reply" in line
    assert "job_id=j" in line
