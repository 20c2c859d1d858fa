"""worker calibrate: measures every batch size and derives consistent settings."""

from __future__ import annotations

from pathlib import Path

from tests.models import two_io_model
from worker.calibrate import calibrate, synthetic_requests
from worker.cli import main
from worker.model import TensorPipeline
from worker.settings import Settings


def test_calibration_measures_each_size_and_keeps_the_target_above_prefetch(tmp_path: Path) -> None:
    model = two_io_model(tmp_path / "m.onnx")
    pipeline = TensorPipeline.load(model, Settings(model=model))
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
