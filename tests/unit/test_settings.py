"""Settings: env vars and flags, validation with messages that name the option and the range."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from worker.settings import SETTINGS, Settings, SettingsError, add_arguments, from_args


def test_defaults_are_valid_and_documented() -> None:
    s = Settings()
    assert s.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert s.max_delay_ms == 0
    assert all(spec.help for spec in SETTINGS)
    assert {spec.field for spec in SETTINGS} == {f for f in Settings.__dataclass_fields__}


def test_from_env_parses_types() -> None:
    s = Settings.from_env(
        {"WORKER_MAX_BATCH": "32", "WORKER_MAX_DELAY_MS": "2.5", "WORKER_MODEL": "m.onnx", "WORKER_EXIT_WHEN_IDLE": "1"}
    )
    assert (s.max_batch, s.max_delay_ms, s.model, s.exit_when_idle) == (32, 2.5, Path("m.onnx"), True)


def test_flags_win_over_env() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    s = from_args(parser.parse_args(["--max-batch", "8", "--device", "cpu"]), env={"WORKER_MAX_BATCH": "16"})
    assert (s.max_batch, s.device) == (8, "cpu")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORKER_MAX_BATCH": "0"}, r"WORKER_MAX_BATCH \(--max-batch\) is 0; it must be between 1 and 65536"),
        ({"WORKER_MAX_BATCH": "many"}, "WORKER_MAX_BATCH is 'many', which is not a int"),
        ({"WORKER_DEVICE": "tpu"}, r"WORKER_DEVICE \(--device\) is 'tpu'; allowed: auto, cpu, cuda"),
        ({"WORKER_MAX_DELAY_MS": "-1"}, "between 0 and 10000"),
        ({"WORKER_EXIT_WHEN_IDLE": "maybe"}, "not a boolean"),
    ],
)
def test_bad_values_fail_at_start_naming_the_option(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)
