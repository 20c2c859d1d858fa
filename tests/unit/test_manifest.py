"""The model manifest: what a valid model.json gives, and that every fault names the file and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker.pipelines.manifest import MANIFEST_FILE, Manifest, ManifestError, has_manifest, load_manifest


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "tokenizer.json").write_text("{}")
    return tmp_path


def write(folder: Path, data: Any) -> Path:
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(data))
    return path


MINIMAL = {"pipeline": "text-embedding", "name": "all-MiniLM-L6-v2"}


def test_minimal_manifest_gets_the_documented_defaults(folder: Path) -> None:
    write(folder, MINIMAL)
    manifest = load_manifest(folder)
    assert manifest == Manifest(folder=folder, pipeline="text-embedding", name="all-MiniLM-L6-v2")
    assert manifest.model_path == folder / "model.onnx"
    assert manifest.tokenizer_path == folder / "tokenizer.json"
    assert (manifest.max_length, manifest.pooling, manifest.normalize, manifest.dim) == (256, "mean", True, 384)
    assert (manifest.text_input, manifest.hidden_state, manifest.output) == ("text", "last_hidden_state", "embedding")
    assert has_manifest(folder)


def test_to_json_reads_back_to_the_same_manifest(folder: Path) -> None:
    original = Manifest(folder=folder, pipeline="text-embedding", name="m", max_length=128, build={"x": 1})
    write(folder, original.to_json())
    assert load_manifest(folder) == original


def test_a_folder_without_manifest_says_how_to_build_it(tmp_path: Path) -> None:
    assert not has_manifest(tmp_path)
    with pytest.raises(ManifestError, match=r"model\.json: no manifest; build the model with `make model`"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("not json", "not valid JSON"),
        ([1, 2], "must hold a JSON object"),
        ({"name": "m"}, "field 'pipeline' is missing"),
        (MINIMAL | {"pipeline": "image-classification"}, "field 'pipeline' is 'image-classification'; allowed"),
        (MINIMAL | {"max_length": "256"}, "field 'max_length' must be an integer"),
        (MINIMAL | {"max_length": True}, "field 'max_length' must be an integer"),
        (MINIMAL | {"normalize": 1}, "field 'normalize' must be a boolean"),
        (MINIMAL | {"dim": 0}, "field 'dim' must be at least 1"),
        (MINIMAL | {"name": ""}, "field 'name' must not be empty"),
        (MINIMAL | {"pooling": "max"}, "field 'pooling' is 'max'; allowed: mean, cls"),
        (MINIMAL | {"normalise": True}, "field 'normalise' is not a manifest field"),
        (MINIMAL | {"max_length": 600}, "field 'max_length' is 600, more than max_positions"),
        (MINIMAL | {"model": "missing.onnx"}, "field 'model' names 'missing.onnx', which is not a file"),
        (MINIMAL | {"tokenizer": "../tokenizer.json"}, "field 'tokenizer' must name a file inside the model folder"),
        (MINIMAL | {"format": 99}, "field 'format' is 99; this worker reads format 1"),
        (MINIMAL | {"build": []}, "field 'build' must be an object"),
    ],
)
def test_faults_name_the_file_and_the_field(folder: Path, data: Any, match: str) -> None:
    path = folder / MANIFEST_FILE
    if isinstance(data, str):
        path.write_text(data)
    else:
        write(folder, data)
    with pytest.raises(ManifestError, match=match) as caught:
        load_manifest(folder)
    assert str(caught.value).startswith(str(path))
