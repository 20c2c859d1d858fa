"""worker calibrate: measures every batch size and derives consistent settings."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

from tests.support.models import two_io_model
from worker.calibrate import Calibration, calibrate, measure_intake, plan_capacity, synthetic_requests
from worker.cli import main
from worker.pipelines.tensor import TensorPipeline
from worker.settings import Settings


def test_calibration_measures_each_size_and_keeps_the_target_above_prefetch(tmp_path: Path) -> None:
    model = two_io_model(tmp_path / "m.onnx")
    pipeline = TensorPipeline.load(model, Settings(model=model).model_config)
    for request in synthetic_requests(pipeline, 3):
        pipeline.prepare(request, max_rows=1)  # synthetic requests fit the model
    result = calibrate(pipeline, [1, 4, 16], queueing_delay_s=0.001, seconds_per_size=0.05)
    assert set(result.rows_per_s) == {1, 4, 16}
    assert all(rate > 0 for rate in result.rows_per_s.values())
    assert result.max_batch in (1, 4, 16)
    assert result.keda_target > result.prefetch >= result.max_batch


def test_calibrate_command_prints_the_suggested_settings(tmp_path: Path, capsys: object) -> None:
    model = two_io_model(tmp_path / "m.onnx")
    assert main(["calibrate", str(model), "--batch-sizes", "1,2", "--seconds-per-size", "0.05"]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "--max-batch" in out
    assert "targetQueueLength" in out
    assert "processes per pod" in out


def _calibration(device_rows_per_s: float, rows_per_message: int = 1) -> Calibration:
    return Calibration({16: device_rows_per_s / 2, 64: device_rows_per_s}, 64, 128, rows_per_message, 30.0)


def test_the_plan_runs_enough_processes_to_keep_the_device_busy() -> None:
    plan = plan_capacity(_calibration(10_000), 0.001, on_cpu=False, cpus=2)
    assert plan.intake_rows_per_s == 1000
    assert plan.processes == 10  # 10,000 device rows/s at 1,000 rows/s per process
    assert plan.pod_rows_per_s == 10_000
    assert plan.keda_target == 300_000  # 10,000 messages/s x 30 s
    packed = plan_capacity(_calibration(10_000, rows_per_message=8), 0.002, on_cpu=False, cpus=2)
    assert packed.processes == 3  # 4,000 rows/s per process


def test_on_the_cpu_the_processes_share_the_cores_with_the_model() -> None:
    plan = plan_capacity(_calibration(10_000), 0.001, on_cpu=True, cpus=2)
    assert plan.processes == 2
    assert plan.pod_rows_per_s == 2000


def test_the_target_stays_above_what_one_pod_holds_and_the_values_paste_into_the_chart() -> None:
    plan = plan_capacity(_calibration(2), 0.001, on_cpu=False, cpus=2)  # 60 messages in 30 s
    assert plan.keda_target == 128 * plan.processes + 1
    values = yaml.safe_load(plan.values_yaml("test"))
    assert values["worker"] == {"processes": 1, "maxBatch": 64, "prefetch": 128}
    assert values["autoscaling"]["targetQueueLength"] == plan.keda_target
    chart = Path(__file__).resolve().parents[2] / "charts" / "qinfer"
    schema = json.loads((chart / "values.schema.json").read_text())
    merged = yaml.safe_load((chart / "values.yaml").read_text())
    for key, part in values.items():
        merged[key] = {**merged[key], **part}
    jsonschema.validate(merged, schema)


def test_intake_is_measured_per_message(tmp_path: Path) -> None:
    model = two_io_model(tmp_path / "m.onnx")
    pipeline = TensorPipeline.load(model, Settings(model=model).model_config)
    assert 0 < measure_intake(pipeline, rows_per_message=4, seconds=0.05) < 0.1
