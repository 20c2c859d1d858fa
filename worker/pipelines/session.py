"""What every pipeline shares: tensor specs, the :class:`Pipeline` protocol, and ONNX Runtime sessions.

:mod:`worker.pipelines.tensor` (tensor models) and :mod:`worker.pipelines.text` (text models) both build on this
module; it depends on neither, so the two pipelines do not import each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import onnxruntime as ort

from producer.wire.errors import ProtocolError
from producer.wire.protocol import DATATYPES, ErrorCode, InferRequest
from worker.batching import Arrays
from worker.errors import ModelLoadError
from worker.pipelines.config import ModelConfig

__all__ = [
    "Part",
    "Pipeline",
    "TensorSpec",
    "check_rows",
    "choose_providers",
    "open_session",
    "preload_cuda_libraries",
    "spec_of",
]

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


class Part(NamedTuple):
    """Consecutive rows of a prepared request, as the pipeline runs them (see :meth:`Pipeline.pieces`)."""

    data: Any
    """What :meth:`Pipeline.run` takes for these rows."""
    rows: int
    length: int | None
    """The length these rows are padded to in a batch (tokens for text), or None when nothing is padded."""


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
            ProtocolError: with the code and a message a person can act on, when it does not fit
                (a request with 0 rows never fits: ``wrong_shape``, alone or in a batch alike).
        """

    def batch_key(self, prepared: Any) -> Hashable:
        """Prepared requests with equal keys can share one model run."""

    def padding_length(self, prepared: Any) -> int | None:
        """The length a prepared request's rows are padded to in a batch, or None when there is no
        padding; the batcher puts requests of similar length together."""

    def pieces(self, prepared: Any) -> list[Part]:
        """A prepared request as the pieces row-level scheduling batches, in row order.

        Text: one piece per row, with its token count, so rows of similar length group across
        requests. Tensors: the whole request as one piece (split by :meth:`split` only when a batch has
        fewer free rows than it has, so a large request is not copied row by row).
        """

    def split(self, data: Any, rows: int) -> tuple[Any, Any]:
        """A piece's first ``rows`` rows and the rest (``0 < rows <`` the piece's rows)."""

    def run(self, prepared: Sequence[Any]) -> list[Arrays]:
        """Run one batch (blocking; may be called from the model thread) and return outputs per item.

        The items are prepared requests, or pieces of them (``Part.data``), in any mix.
        """

    def warm_up(self, max_rows: int) -> None:
        """Run the model at the largest size it accepts: ``max_rows`` rows and, for padded inputs such as
        text, the longest row it accepts; so the first request pays no start-up cost and the memory the
        largest batch needs is taken (or found missing) at start."""

    def describe(self) -> list[str]:
        """What the worker does with a request, step by step (for ``worker inspect``)."""


def check_rows(rows: int, max_rows: int, *, what: str = "rows") -> None:
    """Refuse a request with no rows or with more than ``max_rows`` rows (one batch).

    A request with 0 rows is refused whether it would run alone or in a batch, so its reply does not
    depend on its neighbours.

    Args:
        rows: the request's rows (first dimension).
        max_rows: the worker's largest batch (``--max-batch``).
        what: what a row is, for the message ("rows", "texts").

    Raises:
        ProtocolError: ``wrong_shape`` for 0 rows, ``too_many_rows`` above ``max_rows``.
    """
    if rows == 0:
        raise ProtocolError(ErrorCode.WRONG_SHAPE, f"request has 0 {what} (first dimension 0); send at least one row")
    if rows > max_rows:
        raise ProtocolError(
            ErrorCode.TOO_MANY_ROWS,
            f"request has {rows} {what}; this worker runs at most {max_rows} per batch "
            "(split the request, or raise --max-batch)",
        )


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


_preloaded = False


def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from NVIDIA's wheels (the ``gpu`` extra) before the first CUDA session, once.

    The CUDA provider library finds them on the system's loader path only; the image has no CUDA installation,
    so ``onnxruntime.preload_dlls()`` opens them from the ``nvidia-*`` packages (where they are not installed it
    leaves the system's to the loader). A CPU build of ONNX Runtime has no such function and needs none.
    """
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    with contextlib.redirect_stdout(io.StringIO()):  # its prints would break the JSON log lines on stdout
        ort.preload_dlls()
    _preloaded = True


def open_session(path: Path, config: ModelConfig) -> ort.InferenceSession:
    """An ONNX Runtime session of the model file ``path`` on the device ``config`` asks for.

    Raises:
        ModelLoadError: when the file is missing or invalid, or CUDA was required but is not in use.
    """
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if config.intra_op_threads:
        options.intra_op_num_threads = config.intra_op_threads
    options.log_severity_level = 3
    # The worker's event loop shares the CPU with ONNX Runtime's threads: idle threads must sleep,
    # not spin, or they steal the cores the loop needs to receive and reply.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = choose_providers(config.device, config.device_id)
    if providers[0] != "CPUExecutionProvider":
        preload_cuda_libraries()
    try:
        session = ort.InferenceSession(os.fspath(path), sess_options=options, providers=providers)
    except Exception as e:  # ORT raises its own untyped errors for bad files
        raise ModelLoadError(f"ONNX Runtime could not load {path}: {e}") from e
    if config.device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise ModelLoadError(
            "--device cuda, but ONNX Runtime fell back to the CPU: no usable GPU or CUDA/cuDNN libraries "
            "(check nvidia-smi and the CUDA 13 runtime libraries), or run with --device cpu"
        )
    return session


def spec_of(arg: Any) -> TensorSpec:
    """The :class:`TensorSpec` of one of a session's inputs or outputs (``session.get_inputs()`` items).

    Raises:
        ModelLoadError: when its type has no OIP datatype.
    """
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"model input/output {arg.name!r} has type {arg.type}, which is not supported")
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)
