"""ONNX Runtime sessions: provider choice, input/output introspection, validation, warm-up.

A :class:`Pipeline` turns a list of decoded requests into one model run and back into one result
per request. :class:`TensorPipeline` serves any ONNX model whose inputs and outputs are tensors
with the batch as their first dimension; text models plug in their own pipeline.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from producer.errors import ProtocolError
from producer.protocol import DATATYPES, ErrorCode, InferRequest
from worker.batching import Arrays, concat_inputs, split_outputs
from worker.errors import ModelLoadError
from worker.settings import Settings

# ONNX Runtime's type strings -> OIP datatypes.
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One model input or output: OIP datatype and shape (``None`` for a free dimension)."""

    name: str
    datatype: str
    shape: tuple[int | None, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return DATATYPES[self.datatype]

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.datatype} [{dims}]"


class Pipeline(Protocol):
    """What the consumer needs from a model, whatever its kind."""

    name: str
    version: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    providers: list[str]

    def prepare(self, request: InferRequest, *, max_rows: int) -> Any:
        """Check the request against the model and return what :meth:`run` takes for it.

        Raises:
            ProtocolError: with the code and a message a person can act on, when it does not fit.
        """

    def batch_key(self, prepared: Any) -> Hashable:
        """Prepared requests with equal keys can share one model run."""

    def padding_length(self, prepared: Any) -> int | None:
        """The length a prepared request's rows are padded to in a batch, or None when there is no
        padding; the batcher puts requests of similar length together."""

    def run(self, prepared: Sequence[Any]) -> list[Arrays]:
        """Run one batch (blocking; may be called from the model thread) and return outputs per request."""

    def warm_up(self, max_rows: int) -> None:
        """Run the model at the sizes it will see, so the first request pays no start-up cost."""

    def describe(self) -> list[str]:
        """What the worker does with a request, step by step (for ``worker inspect``)."""


def choose_providers(device: str, device_id: int) -> list[Any]:
    """ONNX Runtime providers for ``--device``: CUDA first when asked for or available, then CPU.

    Raises:
        ModelLoadError: when ``device`` is ``cuda`` but this ONNX Runtime build has no CUDA provider.
    """
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise ModelLoadError(
            "--device cuda, but this ONNX Runtime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu (pip install '.[gpu]') "
            "or run with --device cpu"
        )
    if device in ("cuda", "auto") and has_cuda:
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(path: Path, settings: Settings) -> ort.InferenceSession:
    """An ONNX Runtime session on the device ``settings`` asks for.

    Raises:
        ModelLoadError: when the file is missing or invalid, or CUDA was required but is not in use.
    """
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if settings.intra_op_threads:
        options.intra_op_num_threads = settings.intra_op_threads
    options.log_severity_level = 3
    # The worker's event loop shares the CPU with ONNX Runtime's threads: idle threads must sleep,
    # not spin, or they steal the cores the loop needs to receive and reply.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(
            os.fspath(path), sess_options=options, providers=choose_providers(settings.device, settings.device_id)
        )
    except Exception as e:  # ORT raises its own untyped errors for bad files
        raise ModelLoadError(f"ONNX Runtime could not load {path}: {e}") from e
    if settings.device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise ModelLoadError(
            "--device cuda, but ONNX Runtime fell back to the CPU: no usable GPU or CUDA/cuDNN libraries "
            "(check nvidia-smi and the CUDA 13 runtime libraries), or run with --device cpu"
        )
    return session


def _spec(arg: Any) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"model input/output {arg.name!r} has type {arg.type}, which is not supported")
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


class TensorPipeline:
    """Serves a model whose requests carry its input tensors directly (batch = first dimension)."""

    def __init__(self, session: ort.InferenceSession, *, name: str, version: str) -> None:
        self.session = session
        self.name = name
        self.version = version
        self.inputs = {a.name: _spec(a) for a in session.get_inputs()}
        self.outputs = {a.name: _spec(a) for a in session.get_outputs()}
        self.providers = list(session.get_providers())
        self._output_names = list(self.outputs)

    @classmethod
    def load(cls, path: Path, settings: Settings) -> TensorPipeline:
        name = settings.model_name or path.stem
        return cls(open_session(path, settings), name=name, version=settings.model_version)

    def prepare(self, request: InferRequest, *, max_rows: int) -> InferRequest:
        for name in request.inputs:
            if name not in self.inputs:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_INPUT,
                    f"model {self.name!r} has no input {name!r}; its inputs are: "
                    + "; ".join(s.describe() for s in self.inputs.values()),
                )
        for spec in self.inputs.values():
            arr = request.inputs.get(spec.name)
            if arr is None:
                raise ProtocolError(
                    ErrorCode.MISSING_INPUT, f"input {spec.describe()} is missing; model {self.name!r} needs it"
                )
            if arr.dtype != spec.dtype:
                got = "BYTES" if arr.dtype.kind == "O" else next(k for k, v in DATATYPES.items() if v == arr.dtype)
                raise ProtocolError(
                    ErrorCode.WRONG_DATATYPE, f"input {spec.name!r} is {got}; the model expects {spec.datatype}"
                )
            if arr.ndim != len(spec.shape) or any(
                want is not None and got != want for got, want in zip(arr.shape[1:], spec.shape[1:], strict=False)
            ):
                raise ProtocolError(
                    ErrorCode.WRONG_SHAPE,
                    f"input {spec.name!r} has shape {list(arr.shape)}; the model expects {spec.describe()} "
                    "(first dimension = rows)",
                )
        if request.rows > max_rows:
            raise ProtocolError(
                ErrorCode.TOO_MANY_ROWS,
                f"request has {request.rows} rows; this worker runs at most {max_rows} per batch "
                "(split the request, or raise --max-batch)",
            )
        if request.outputs:
            for out in request.outputs:
                if out not in self.outputs:
                    raise ProtocolError(
                        ErrorCode.UNKNOWN_OUTPUT,
                        f"model {self.name!r} has no output {out!r}; its outputs are: {', '.join(self.outputs)}",
                    )
        return request

    def batch_key(self, request: InferRequest) -> Hashable:
        return tuple(arr.shape[1:] for arr in request.inputs.values())

    def padding_length(self, request: InferRequest) -> None:
        return None  # tensors are concatenated as they are, never padded

    def run(self, requests: Sequence[InferRequest]) -> list[Arrays]:
        feeds = concat_inputs([r.inputs for r in requests])
        values = self.session.run(self._output_names, feeds)
        outputs = dict(zip(self._output_names, values, strict=True))
        per_request = split_outputs(outputs, [r.rows for r in requests])
        return [
            {k: v for k, v in out.items() if k in r.outputs} if r.outputs else out
            for r, out in zip(requests, per_request, strict=True)
        ]

    def describe(self) -> list[str]:
        """What the worker does with a request, step by step (for ``worker inspect``)."""
        return [
            "check each request's tensors against the model's inputs (names, datatypes, non-batch dimensions)",
            "concatenate compatible requests along the first dimension, up to --max-batch rows",
            "run the model; split every output back by each request's rows",
        ]

    def warm_up(self, max_rows: int) -> None:
        for rows in sorted({1, max_rows}):
            feeds = {
                spec.name: np.zeros((rows, *[d or 1 for d in spec.shape[1:]]), dtype=spec.dtype)
                for spec in self.inputs.values()
            }
            self.session.run(self._output_names, feeds)


def load_pipeline(settings: Settings) -> Pipeline:
    """The pipeline for ``settings.model``: a model folder with a manifest, or a bare ``.onnx`` file.

    Raises:
        ModelLoadError: with what is missing and how to get it.
    """
    path = settings.model
    if path.is_dir():
        manifest = path / "model.json"
        if manifest.is_file():
            from worker.text_pipeline import TextEmbeddingPipeline  # imports the tokenizer only when needed

            return TextEmbeddingPipeline.load(path, settings)
        path = path / "model.onnx"
    if not path.exists():
        hint = " (build the default model with `make model`)" if "all-MiniLM-L6-v2" in os.fspath(path) else ""
        raise ModelLoadError(f"no model at {settings.model}{hint}; pass --model PATH or set WORKER_MODEL")
    return TensorPipeline.load(path, settings)
