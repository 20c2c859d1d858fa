"""Tensor models and the choice of pipeline: validation, batching by concatenation, warm-up.

A :class:`Pipeline` (defined in :mod:`worker.pipelines.session`, re-exported here) turns a list of decoded
requests into one model run and back into one result per request. :class:`TensorPipeline` serves any
ONNX model whose inputs and outputs are tensors with the batch as their first dimension; text models
plug in their own pipeline (:mod:`worker.pipelines.text`), and :func:`load_pipeline` picks one.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from producer.wire.errors import ProtocolError, clip
from producer.wire.protocol import ErrorCode, InferRequest, numpy_to_datatype
from producer.wire.rows import concat_rows, split_rows
from worker.batching import Arrays
from worker.errors import ModelLoadError
from worker.pipelines.config import ModelConfig
from worker.pipelines.session import Part, Pipeline, TensorSpec, check_rows, choose_providers, open_session, spec_of

__all__ = ["Pipeline", "TensorPipeline", "TensorSpec", "choose_providers", "load_pipeline", "open_session"]


class TensorPipeline:
    """Serves a model whose requests carry its input tensors directly (batch = first dimension)."""

    def __init__(self, session: ort.InferenceSession, *, name: str, version: str) -> None:
        self.session = session
        self.name = name
        self.version = version
        self.inputs = {a.name: spec_of(a) for a in session.get_inputs()}
        self.outputs = {a.name: spec_of(a) for a in session.get_outputs()}
        self.providers = list(session.get_providers())
        self._output_names = list(self.outputs)

    @classmethod
    def load(cls, path: Path, config: ModelConfig) -> TensorPipeline:
        """Open an ONNX Runtime session of the model file ``path`` (not ``config.path``: that may be its folder)."""
        return cls(open_session(path, config), name=config.name or path.stem, version=config.version)

    def prepare(self, request: InferRequest, *, max_rows: int) -> InferRequest:
        """Check a request's tensors against the model's inputs and its requested outputs.

        Raises:
            ProtocolError: ``unknown_input``, ``missing_input``, ``wrong_datatype``, ``wrong_shape`` (also for
                0 rows), ``too_many_rows`` or ``unknown_output``; echoed names and shapes are clipped.
        """
        for name in request.inputs:
            if name not in self.inputs:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_INPUT,
                    f"model {self.name!r} has no input {clip(name)}; its inputs are: "
                    + "; ".join(s.describe() for s in self.inputs.values()),
                )
        for spec in self.inputs.values():
            arr = request.inputs.get(spec.name)
            if arr is None:
                raise ProtocolError(
                    ErrorCode.MISSING_INPUT, f"input {spec.describe()} is missing; model {self.name!r} needs it"
                )
            if arr.dtype != spec.dtype:
                raise ProtocolError(
                    ErrorCode.WRONG_DATATYPE,
                    f"input {spec.name!r} is {numpy_to_datatype(arr.dtype)}; the model expects {spec.datatype}",
                )
            if arr.ndim != len(spec.shape) or any(
                want is not None and got != want for got, want in zip(arr.shape[1:], spec.shape[1:], strict=False)
            ):
                raise ProtocolError(
                    ErrorCode.WRONG_SHAPE,
                    f"input {spec.name!r} has shape {clip(list(arr.shape))}; the model expects {spec.describe()} "
                    "(first dimension = rows)",
                )
        check_rows(request.rows, max_rows)
        if request.outputs:
            for out in request.outputs:
                if out not in self.outputs:
                    raise ProtocolError(
                        ErrorCode.UNKNOWN_OUTPUT,
                        f"model {self.name!r} has no output {clip(out)}; its outputs are: {', '.join(self.outputs)}",
                    )
        return request

    def batch_key(self, request: InferRequest) -> Hashable:
        return tuple(arr.shape[1:] for arr in request.inputs.values())

    def padding_length(self, request: InferRequest) -> None:
        return None  # tensors are concatenated as they are, never padded

    def pieces(self, request: InferRequest) -> list[Part]:
        return [Part(request, request.rows, None)]  # split only when a batch has less room (see split)

    def split(self, request: InferRequest, rows: int) -> tuple[InferRequest, InferRequest]:
        """The first ``rows`` rows and the rest, as requests over views of the inputs (no copy)."""
        head = {name: value[:rows] for name, value in request.inputs.items()}
        tail = {name: value[rows:] for name, value in request.inputs.items()}
        return (
            InferRequest(id=request.id, inputs=head, outputs=request.outputs),
            InferRequest(id=request.id, inputs=tail, outputs=request.outputs),
        )

    def run(self, requests: Sequence[InferRequest]) -> list[Arrays]:
        feeds = concat_rows([r.inputs for r in requests])
        values = self.session.run(self._output_names, feeds)
        outputs = dict(zip(self._output_names, values, strict=True))
        per_request = split_rows(outputs, [r.rows for r in requests])
        return [
            {k: v for k, v in out.items() if k in r.outputs} if r.outputs else out
            for r, out in zip(requests, per_request, strict=True)
        ]

    def describe(self) -> list[str]:
        """What the worker does with a request, step by step (for ``worker inspect``)."""
        return [
            "check each request's tensors against the model's inputs (names, datatypes, non-batch dimensions)",
            "concatenate compatible requests along the first dimension, up to --max-batch rows (with "
            "--schedule rows, a request that does not fit a batch whole lends its first rows to it)",
            "run the model; split every output back by each request's rows",
        ]

    def warm_up(self, max_rows: int) -> None:
        for rows in sorted({1, max_rows}):
            feeds = {
                spec.name: np.zeros((rows, *[d or 1 for d in spec.shape[1:]]), dtype=spec.dtype)
                for spec in self.inputs.values()
            }
            self.session.run(self._output_names, feeds)


def load_pipeline(config: ModelConfig) -> Pipeline:
    """The pipeline for ``config.path``: a model folder with a manifest, or a bare ``.onnx`` file.

    Raises:
        ModelLoadError: with what is missing and how to get it.
    """
    path = config.path
    if path.is_dir():
        manifest = path / "model.json"
        if manifest.is_file():
            from worker.pipelines.text import TextEmbeddingPipeline  # imports the tokenizer only when needed

            return TextEmbeddingPipeline.load(path, config)
        path = path / "model.onnx"
    if not path.exists():
        hint = " (build the default model with `make model`)" if "all-MiniLM-L6-v2" in os.fspath(path) else ""
        raise ModelLoadError(f"no model at {config.path}{hint}; pass --model PATH or set WORKER_MODEL")
    return TensorPipeline.load(path, config)
