"""The model manifest: ``model.json`` beside an ONNX model says which pipeline serves it.

A model folder holds the ONNX file, the tokenizer and this manifest, for example::

    models/all-MiniLM-L6-v2/
        model.json       {"pipeline": "text-embedding", "model": "model.onnx", "tokenizer": "tokenizer.json", ...}
        model.onnx
        tokenizer.json

:func:`load_manifest` reads and validates it into a frozen :class:`Manifest`; every problem is reported as a
:class:`ManifestError` naming the file and the field. ``scripts/build_model.py`` writes it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from producer.wire.errors import InferenceError

__all__ = [
    "MANIFEST_FILE",
    "PIPELINES",
    "POOLINGS",
    "Manifest",
    "ManifestError",
    "has_manifest",
    "load_manifest",
]

MANIFEST_FILE = "model.json"
"""File name of the manifest inside a model folder."""

PIPELINES = ("text-embedding",)
"""Pipelines a manifest may name."""

POOLINGS = ("mean", "cls")
"""How a text-embedding pipeline reduces the per-token hidden states to one vector per row."""

FORMAT = 1
"""Manifest format this code reads; a manifest with a higher ``format`` is refused."""

Pipeline = Literal["text-embedding"]
Pooling = Literal["mean", "cls"]


class ManifestError(InferenceError, ValueError):
    """Raised when a model folder's manifest is missing, unreadable, or has a missing or invalid field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest:
    """What a model folder holds and how to serve it.

    Attributes:
        folder: the model folder (file names below are relative to it).
        pipeline: the pipeline serving the model; only ``text-embedding`` so far.
        name: model name replies carry.
        version: model version replies carry.
        model: ONNX file name.
        tokenizer: ``tokenizers`` JSON file name.
        max_length: tokens per row, special tokens included; longer texts are truncated (default 256).
        max_positions: most tokens per row the model accepts at all (position embeddings); bounds any
            ``max_length`` override (default 512).
        text_input: name of the BYTES request input carrying one text per row (default ``text``).
        hidden_state: name of the model output holding the last hidden state [rows, tokens, dim].
        pooling: ``mean`` (attention-masked mean over tokens) or ``cls`` (the first token).
        normalize: whether embeddings are L2-normalized.
        output: name of the reply output carrying the embeddings, FP32 [rows, dim].
        dim: embedding width.
        precision: weights precision of the ONNX file (``fp32``, ``fp16``, or ``int8`` for dynamically
            quantized weights; inputs and outputs stay as declared).
        build: free-form facts the build recorded (source, versions, checksums); not interpreted by the worker.
    """

    folder: Path
    pipeline: Pipeline
    name: str
    version: str = "1"
    model: str = "model.onnx"
    tokenizer: str = "tokenizer.json"
    max_length: int = 256
    max_positions: int = 512
    text_input: str = "text"
    hidden_state: str = "last_hidden_state"
    pooling: Pooling = "mean"
    normalize: bool = True
    output: str = "embedding"
    dim: int = 384
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    build: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def path(self) -> Path:
        """The manifest file."""
        return self.folder / MANIFEST_FILE

    @property
    def model_path(self) -> Path:
        """The ONNX file."""
        return self.folder / self.model

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer file."""
        return self.folder / self.tokenizer

    def to_json(self) -> dict[str, Any]:
        """The manifest as the JSON object :func:`load_manifest` reads back (``folder`` left out)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "folder"}
        data["build"] = dict(self.build)
        return {"format": FORMAT, **data}


# field -> (python type, allowed values or None); "folder" and "build" are handled apart.
_FIELDS: dict[str, tuple[type, tuple[Any, ...] | None]] = {
    "pipeline": (str, PIPELINES),
    "name": (str, None),
    "version": (str, None),
    "model": (str, None),
    "tokenizer": (str, None),
    "max_length": (int, None),
    "max_positions": (int, None),
    "text_input": (str, None),
    "hidden_state": (str, None),
    "pooling": (str, POOLINGS),
    "normalize": (bool, None),
    "output": (str, None),
    "dim": (int, None),
    "precision": (str, ("fp32", "fp16", "int8")),
}
_REQUIRED = ("pipeline", "name")


def has_manifest(folder: Path) -> bool:
    """Whether ``folder`` is a directory with a manifest file (it may still be invalid)."""
    return (folder / MANIFEST_FILE).is_file()


def load_manifest(folder: Path | str) -> Manifest:
    """Read and validate ``folder/model.json``.

    Checks every field's type and allowed values, that lengths and sizes are positive with
    ``max_length <= max_positions``, that file names stay inside the folder, and that the model and tokenizer
    files exist.

    Raises:
        ManifestError: naming the file and the field, when anything is wrong.
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest; build the model with `make model`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read it: {e}") from e
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: must hold a JSON object, not {type(raw).__name__}")

    def fail(field: str, problem: str) -> ManifestError:
        return ManifestError(f"{path}: field {field!r} {problem}")

    fmt = raw.pop("format", FORMAT)
    if type(fmt) is not int or fmt < 1:
        raise fail("format", f"must be a positive integer, got {fmt!r}")
    if fmt > FORMAT:
        raise fail("format", f"is {fmt}; this worker reads format {FORMAT} and older, upgrade it")
    unknown = sorted(set(raw) - set(_FIELDS) - {"build"})
    if unknown:
        raise fail(unknown[0], f"is not a manifest field; known fields: format, build, {', '.join(_FIELDS)}")
    for field in _REQUIRED:
        if field not in raw:
            raise fail(field, "is missing")
    values: dict[str, Any] = {}
    for field, value in raw.items():
        if field == "build":
            if not isinstance(value, dict):
                raise fail(field, f"must be an object, got {type(value).__name__}")
            values[field] = value
            continue
        kind, allowed = _FIELDS[field]
        # bool is an int in Python; JSON true must not pass as a length, nor 1 as a boolean.
        if type(value) is not kind:
            raise fail(field, f"must be {_JSON_TYPE[kind]}, got {json.dumps(value)}")
        if allowed is not None and value not in allowed:
            raise fail(field, f"is {value!r}; allowed: {', '.join(map(str, allowed))}")
        if kind is int and isinstance(value, int) and value < 1:
            raise fail(field, f"must be at least 1, got {value}")
        if isinstance(value, str) and not value:
            raise fail(field, "must not be empty")
        values[field] = value
    manifest = Manifest(folder=folder, **values)
    if int(manifest.max_length) > int(manifest.max_positions):
        raise fail("max_length", f"is {manifest.max_length}, more than max_positions ({manifest.max_positions})")
    for field in ("model", "tokenizer"):
        name = getattr(manifest, field)
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise fail(field, f"must name a file inside the model folder, got {name!r}")
        if not (folder / name).is_file():
            raise fail(field, f"names {name!r}, which is not a file in {folder}")
    return manifest


_JSON_TYPE = {str: "a string", int: "an integer", bool: "a boolean"}
