"""What loading a model needs, and nothing else: where it is, what replies call it, where it runs, text limits.

:class:`ModelConfig` is built from the worker's settings (:attr:`worker.settings.Settings.model_config`) and
handed to :func:`worker.pipelines.tensor.load_pipeline`; the pipelines never see the rest of the settings.
Pure data: importing it loads neither ONNX Runtime nor a tokenizer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

Device = Literal["auto", "cpu", "cuda"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """How to load one model (see the ``WORKER_*`` settings of the same names for units and defaults).

    Args:
        path: an ONNX model file, or a model folder (with a ``model.json`` manifest, or a ``model.onnx``).
        name: the model name replies carry; empty: the manifest's name, else the file's stem.
        version: the model version replies carry (tensor models; a manifest names its own).
        device: ``auto`` (CUDA when ONNX Runtime has it, else the CPU), ``cpu`` or ``cuda`` (CUDA or fail).
        device_id: the CUDA device ordinal.
        intra_op_threads: ONNX Runtime intra-op threads; 0: ONNX Runtime's default.
        max_text_length: text models: tokens per row (at most the manifest's positions); longer texts are truncated.
        max_text_bytes: text models: most UTF-8 bytes per text, checked before tokenizing.
        group_by_length: text models: let the batcher put texts of similar token length together.
        routed: the worker serves a version of a model's route, so ``version`` names replies of text models too
            (else a text model's replies carry its manifest's version).
    """

    path: Path
    name: str
    version: str
    device: Device
    device_id: int
    intra_op_threads: int
    max_text_length: int
    max_text_bytes: int
    group_by_length: bool
    routed: bool = False
