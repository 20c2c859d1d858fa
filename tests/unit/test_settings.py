"""Settings: env vars and flags, validation with messages that name the option and the range."""

from __future__ import annotations

import argparse
import dataclasses
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


def test_the_loader_reads_the_url_file_and_a_copy_does_not_read_it_again(tmp_path: Path) -> None:
    url_file = tmp_path / "url"
    url_file.write_text("amqp://user:secret@rabbitmq:5672/\n")
    s = Settings.from_env({"AMQP_URL_FILE": str(url_file)})
    url_file.unlink()  # a copy is a plain copy: nothing is read or rewritten
    copy = dataclasses.replace(s, max_batch=8)
    assert (copy.amqp_url, copy.amqp_url_file, copy.max_batch) == ("amqp://user:secret@rabbitmq:5672/", url_file, 8)
    with pytest.raises(SettingsError, match=r"cannot read AMQP_URL_FILE"):
        Settings.from_env({"AMQP_URL_FILE": str(url_file)})


def test_a_routed_copy_that_no_longer_names_its_version_queue_is_refused() -> None:
    routed = Settings.from_env({}, model_name="minilm", model_version="2", traffic_weight=10)
    assert routed.queue == "model.minilm.v2"
    with pytest.raises(SettingsError, match=r"consumes its version's queue model\.minilm\.v3, not WORKER_QUEUE"):
        dataclasses.replace(routed, model_version="3")


def test_types_give_the_parsers_and_the_choices() -> None:
    specs = {spec.field: spec for spec in SETTINGS}
    assert specs["log_level"].choices == ("debug", "info", "warning", "error")
    assert specs["max_delay_ms"].parse("2.5") == 2.5
    assert specs["ca_file"].parse("") is None
    assert all(spec.flag == "--" + spec.field.replace("_", "-") for spec in SETTINGS)


def test_the_model_config_carries_what_loading_needs() -> None:
    s = Settings(model=Path("m"), model_name="n", device="cpu", intra_op_threads=2, max_text_bytes=100)
    config = s.model_config
    assert (config.path, config.name, config.device, config.intra_op_threads, config.max_text_bytes) == (
        Path("m"),
        "n",
        "cpu",
        2,
        100,
    )
