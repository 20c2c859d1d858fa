"""Serves a text-embedding model folder: strings in, L2-normalized embeddings out.

Requests carry one BYTES input (``text``, one string per row). Texts are tokenized when the
request arrives (so batches can be formed by length; with row-level scheduling each text is a piece
of its own, see :meth:`TextEmbeddingPipeline.pieces`), padded to the longest row of their batch,
run through ONNX Runtime, mean-pooled with the attention mask and normalized. Replies carry one
FP32 output (``embedding``, [rows, dim]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from producer.wire.errors import ProtocolError, clip
from producer.wire.protocol import ErrorCode, InferRequest
from worker.batching import Arrays
from worker.pipelines.config import ModelConfig
from worker.pipelines.manifest import ManifestError, load_manifest
from worker.pipelines.session import Part, TensorSpec, check_rows, open_session
from worker.pipelines.text_steps import IdArray, TextPipeline, texts_from_tensor


@dataclasses.dataclass(frozen=True, slots=True)
class Tokenized:
    """A request's rows as token ids, ready to be padded with its batch."""

    rows: list[IdArray]
    longest: int


class TextEmbeddingPipeline:
    """The worker's pipeline for a ``text-embedding`` model folder (see ``worker.pipelines.manifest``)."""

    def __init__(self, text: TextPipeline, session: Any, *, group_by_length: bool, max_text_bytes: int) -> None:
        """Serve ``text`` (tokenizer, padding, pooling) with the ONNX Runtime ``session`` of its model.

        Args:
            text: the model folder's text pipeline.
            session: an ONNX Runtime session of the model (see :func:`worker.pipelines.session.open_session`).
            group_by_length: let the batcher put texts of similar token length together.
            max_text_bytes: most UTF-8 bytes per text, checked before tokenizing (``WORKER_MAX_TEXT_BYTES``); a
                longer text gets ``text_too_long``.
        """
        self.text = text
        self.max_text_bytes = max_text_bytes
        self.session = session
        manifest = text.manifest
        self.name = manifest.name
        self.version = manifest.version
        self.providers = list(session.get_providers())
        self.group_by_length = group_by_length
        self.inputs = {text.text_input: TensorSpec(text.text_input, "BYTES", (None,))}
        self.outputs = {text.output: TensorSpec(text.output, "FP32", (None, text.dim))}
        self._fetch = [text.hidden_state]

    @classmethod
    def load(cls, folder: Path, config: ModelConfig) -> TextEmbeddingPipeline:
        """Load the manifest, the tokenizer and an ONNX Runtime session for ``folder``.

        Raises:
            ManifestError: when the manifest is missing or wrong.
            ModelLoadError: when ONNX Runtime cannot load the model on the requested device.
        """
        manifest = load_manifest(folder)
        session = open_session(manifest.model_path, config)
        max_length = min(config.max_text_length, manifest.max_positions)
        try:
            text = TextPipeline(
                manifest,
                model_inputs=[i.name for i in session.get_inputs()],
                model_outputs=[o.name for o in session.get_outputs()],
                max_length=max_length,
            )
        except ManifestError:
            raise
        pipeline = cls(text, session, group_by_length=config.group_by_length, max_text_bytes=config.max_text_bytes)
        if config.name:
            pipeline.name = config.name
        if config.routed:  # a version of a model's route: the version is the worker's, as for tensor models
            pipeline.version = config.version
        return pipeline

    def prepare(self, request: InferRequest, *, max_rows: int) -> Tokenized:
        """Check a request's texts and tokenize them.

        Every text's UTF-8 length is checked against ``max_text_bytes`` before any text is tokenized.

        Raises:
            ProtocolError: ``unknown_input``, ``missing_input``, ``wrong_datatype``, ``wrong_shape`` (also for
                0 texts), ``invalid_tensor``, ``too_many_rows``, ``text_too_long`` or ``unknown_output``.
        """
        name = self.text.text_input
        unknown = [n for n in request.inputs if n != name]
        if unknown:
            raise ProtocolError(
                ErrorCode.UNKNOWN_INPUT,
                f"model {self.name!r} takes one input, {name!r} (BYTES, one string per row); got {clip(unknown[0])}",
            )
        if name not in request.inputs:
            raise ProtocolError(ErrorCode.MISSING_INPUT, f"input {name!r} (BYTES, one string per row) is missing")
        array = request.inputs[name]
        if array.ndim:  # the row count is known before any text is read
            check_rows(int(array.shape[0]), max_rows, what="texts")
        texts = texts_from_tensor(array, name=name, max_bytes=self.max_text_bytes)
        check_rows(len(texts), max_rows, what="texts")
        if request.outputs and any(o != self.text.output for o in request.outputs):
            raise ProtocolError(ErrorCode.UNKNOWN_OUTPUT, f"model {self.name!r} has one output, {self.text.output!r}")
        rows = self.text.tokenize(texts)
        return Tokenized(rows, max((len(r) for r in rows), default=0))

    def batch_key(self, prepared: Tokenized) -> Hashable:
        return 0  # any texts can share a run; padding_length keeps similar lengths together

    def padding_length(self, prepared: Tokenized) -> int | None:
        # With grouping, the batcher fills a batch with the texts closest in length to the oldest
        # one, so short texts do not pay for a long neighbour's padding.
        return prepared.longest if self.group_by_length else None

    def pieces(self, prepared: Tokenized) -> list[Part]:
        """One piece per text, with its token count when grouping by length (else None: arrival order)."""
        group = self.group_by_length
        return [Part(Tokenized([row], len(row)), 1, len(row) if group else None) for row in prepared.rows]

    def split(self, prepared: Tokenized, rows: int) -> tuple[Tokenized, Tokenized]:
        head, tail = prepared.rows[:rows], prepared.rows[rows:]
        return Tokenized(head, max(len(r) for r in head)), Tokenized(tail, max(len(r) for r in tail))

    def run(self, prepared: Sequence[Tokenized]) -> list[Arrays]:
        rows = [row for p in prepared for row in p.rows]
        batch = self.text.pad(rows)
        hidden = self.session.run(self._fetch, self.text.feeds(batch))[0]
        vectors = self.text.pool(hidden, batch)
        bounds = np.cumsum([len(p.rows) for p in prepared])[:-1]
        return [{self.text.output: part} for part in np.split(vectors, bounds)]

    def warm_up(self, max_rows: int) -> None:
        """Run one short text first, then what the device needs before the first request.

        On a GPU: ``max_rows`` texts of the longest length accepted (``max_length`` tokens), so the
        largest batch's memory is taken at start. On the CPU, where memory is taken as it is needed and
        that full batch is the slowest part of a cold start (seconds for MiniLM on two cores), one text
        of the longest length and a full batch of short texts: every kernel and both extremes of the
        shapes are run once, at a fraction of the cost."""
        short = self.text.tokenize(["warm up"])
        longest = self.text.tokenize(["warm up " * self.text.max_length])[0]  # truncated at max_length tokens
        if self.providers[0] == "CPUExecutionProvider":
            passes = [short, [longest], short * max_rows]
        else:
            passes = [short, [longest] * max_rows]
        for rows in passes:
            self.run([Tokenized(rows, max(len(r) for r in rows))])

    def describe(self) -> list[str]:
        """What the worker does with a request, step by step (for ``worker inspect``)."""
        m = self.text.manifest
        return [
            f"tokenize '{self.text.text_input}' with {m.tokenizer_path.name}, truncating at {self.text.max_length} "
            "tokens",
            "batch texts of similar length together (across requests with --schedule rows)"
            if self.group_by_length
            else "batch texts in arrival order",
            "pad each batch to its longest text; run the model; "
            f"{m.pooling}-pool '{m.hidden_state}' over real tokens" + (", L2-normalize" if m.normalize else ""),
            f"reply '{self.text.output}' FP32 [rows, {self.text.dim}]",
        ]
