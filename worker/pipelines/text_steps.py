"""The text-embedding pipeline: strings -> tokens -> padded model inputs -> pooled, normalized embeddings.

Pure: no broker and no ONNX Runtime session here. The worker owns the session and hands this module the
hidden states it computed, so the same code serves the worker, the benchmark and the reference tests::

    pipeline = TextPipeline.from_folder("models/all-MiniLM-L6-v2", model_inputs=names_the_session_declares)
    rows = pipeline.tokenize(["a text", "another one"])            # one int64 id array per text
    for group in group_by_length(token_counts(rows), max_rows=64):
        batch = pipeline.pad([rows[i] for i in group])             # padded to the longest row of this group
        hidden = session.run([pipeline.hidden_state], pipeline.feeds(batch))[0]
        vectors = pipeline.pool(hidden, batch)                     # float32 [len(group), dim]

Rows are padded to the longest row *of their batch*, never to a fixed size, and :func:`group_by_length` forms
batches of rows of similar length so short texts do not pay for a long neighbour's padding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from producer.wire.errors import ProtocolError, clip
from producer.wire.protocol import ErrorCode, numpy_to_datatype
from worker.pipelines.manifest import Manifest, ManifestError, load_manifest

__all__ = [
    "MODEL_INPUTS",
    "PaddedBatch",
    "TextPipeline",
    "cls_pool",
    "group_by_length",
    "l2_normalize",
    "load_tokenizer",
    "mean_pool",
    "pad_rows",
    "padded_tokens",
    "texts_from_tensor",
    "token_counts",
]

IdArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
"""Inputs a text model may declare (BERT naming); each is int64 [rows, tokens]. ``input_ids`` is required."""


# ---------------------------------------------------------------------------------------------
# Pure helpers


def pad_rows(rows: Sequence[IdArray], *, pad_id: int = 0) -> tuple[IdArray, IdArray]:
    """Pad token id rows to the longest of them.

    Args:
        rows: one int64 id array per row (special tokens included), at least one row.
        pad_id: id written after each row's end.

    Returns:
        ``(input_ids, attention_mask)``, both int64 [len(rows), longest]; the mask is 1 on real tokens.
    """
    if not rows:
        raise ValueError("pad_rows needs at least one row")
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    longest = int(lengths.max())
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    mask = (np.arange(longest, dtype=np.int64)[None, :] < lengths[:, None]).astype(np.int64)
    return ids, mask


def mean_pool(hidden: npt.NDArray[np.floating[Any]], attention_mask: npt.NDArray[np.integer[Any]]) -> FloatArray:
    """Average each row's hidden states over its real tokens (the sentence-transformers mean pooling).

    Args:
        hidden: [rows, tokens, dim] last hidden state.
        attention_mask: [rows, tokens], 1 on real tokens, 0 on padding.

    Returns:
        float32 [rows, dim]. A row without real tokens pools to zeros.
    """
    mask = attention_mask.astype(np.float32)
    summed = np.matmul(mask[:, None, :], hidden.astype(np.float32, copy=False))[:, 0, :]
    counts = np.maximum(mask.sum(axis=1, keepdims=True), np.float32(1e-9))
    pooled: FloatArray = (summed / counts).astype(np.float32, copy=False)
    return pooled


def cls_pool(hidden: npt.NDArray[np.floating[Any]]) -> FloatArray:
    """Each row's first token's hidden state, float32 [rows, dim]."""
    return np.ascontiguousarray(hidden[:, 0, :], dtype=np.float32)


def l2_normalize(vectors: FloatArray, *, eps: float = 1e-12) -> FloatArray:
    """Scale each row to unit L2 norm; rows with a norm below ``eps`` are divided by ``eps`` (as torch does)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    scaled: FloatArray = (vectors / np.maximum(norms, np.float32(eps))).astype(np.float32, copy=False)
    return scaled


def group_by_length(lengths: Sequence[int], max_rows: int, *, max_padded_tokens: int | None = None) -> list[list[int]]:
    """Split rows into batches of rows of similar token length, so padding to each batch's longest row is cheap.

    Rows are sorted by length (ties keep their order) and cut into as few batches of at most ``max_rows`` as
    possible, of nearly equal size. With ``max_padded_tokens``, a batch is split further so that
    ``rows * longest`` stays within it (a single row longer than the budget forms a batch of its own).

    Args:
        lengths: token count of each row (index i is row i).
        max_rows: most rows per batch, at least 1.
        max_padded_tokens: optional bound on the padded size (rows x longest row) of a batch.

    Returns:
        Lists of row indices, each sorted by length; shorter batches first. Every index appears once.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    if max_padded_tokens is not None and max_padded_tokens < 1:
        raise ValueError(f"max_padded_tokens must be at least 1, got {max_padded_tokens}")
    if any(n < 0 for n in lengths):
        raise ValueError("lengths must not be negative")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if not order:
        return []
    count = math.ceil(len(order) / max_rows)
    base, extra = divmod(len(order), count)
    groups: list[list[int]] = []
    start = 0
    for g in range(count):
        size = base + (1 if g < extra else 0)
        groups.append(order[start : start + size])
        start += size
    if max_padded_tokens is None:
        return groups
    split: list[list[int]] = []
    for group in groups:
        current: list[int] = []
        for i in group:  # ascending, so lengths[i] is the longest of current + [i]
            if current and (len(current) + 1) * lengths[i] > max_padded_tokens:
                split.append(current)
                current = []
            current.append(i)
        split.append(current)
    return split


def token_counts(rows: Sequence[IdArray]) -> list[int]:
    """Token count of each tokenized row (before padding): what :func:`group_by_length` takes."""
    return [len(row) for row in rows]


def padded_tokens(lengths: Sequence[int], groups: Sequence[Sequence[int]]) -> int:
    """Token slots the model computes for ``groups`` when each is padded to its longest row."""
    return sum(len(g) * max((lengths[i] for i in g), default=0) for g in groups)


def texts_from_tensor(array: npt.NDArray[Any], *, name: str = "text", max_bytes: int | None = None) -> list[str]:
    """The strings of a BYTES request input: one per row, shape [rows] or [rows, 1].

    Bytes elements are decoded as UTF-8. With ``max_bytes``, each text's UTF-8 length is checked
    before anything else is done with it (a bytes element before it is decoded).

    Args:
        array: the request input.
        name: the input's name, for messages.
        max_bytes: most UTF-8 bytes per text (the worker's ``WORKER_MAX_TEXT_BYTES``), or None for no bound.

    Raises:
        ProtocolError: ``wrong_datatype`` for a non-BYTES tensor, ``wrong_shape`` for another shape,
            ``invalid_tensor`` for an element that is not a string or not valid UTF-8 (or Unicode that
            cannot be UTF-8, such as a lone surrogate), ``text_too_long`` for a text over ``max_bytes``.
    """
    if array.dtype.kind != "O":
        raise ProtocolError(
            ErrorCode.WRONG_DATATYPE,
            f"input {clip(name)} must be BYTES (one string per row), got {numpy_to_datatype(array.dtype)}",
        )
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ProtocolError(
            ErrorCode.WRONG_SHAPE,
            f"input {clip(name)} must have shape [rows] or [rows, 1], got {clip(list(array.shape))}",
        )
    texts: list[str] = []
    for row, item in enumerate(array.tolist()):
        if isinstance(item, str):
            if item.isascii():
                size = len(item)
            else:
                try:
                    size = len(item.encode("utf-8"))
                except UnicodeEncodeError as e:
                    raise ProtocolError(
                        ErrorCode.INVALID_TENSOR, f"input {clip(name)} row {row}: not valid Unicode: {e.reason}"
                    ) from e
            _check_text_size(size, max_bytes, name, row)
            texts.append(item)
        elif isinstance(item, bytes):
            _check_text_size(len(item), max_bytes, name, row)
            try:
                texts.append(item.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ProtocolError(ErrorCode.INVALID_TENSOR, f"input {clip(name)} row {row}: not UTF-8: {e}") from e
        else:
            raise ProtocolError(
                ErrorCode.INVALID_TENSOR, f"input {clip(name)} row {row}: expected a string, got {type(item).__name__}"
            )
    return texts


def _check_text_size(size: int, max_bytes: int | None, name: str, row: int) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ProtocolError(
            ErrorCode.TEXT_TOO_LONG,
            f"input {clip(name)} row {row}: text is {size} bytes (UTF-8); this worker accepts at most {max_bytes} "
            "(shorten or split the text, or raise WORKER_MAX_TEXT_BYTES)",
        )


def load_tokenizer(path: Path | str, *, max_length: int) -> tuple[Tokenizer, int]:
    """Load a ``tokenizers`` JSON file set up to truncate at ``max_length`` tokens and not to pad.

    Padding is left to :func:`pad_rows`, per batch.

    Returns:
        ``(tokenizer, pad_id)``; the pad id comes from the file's padding settings, else its ``[PAD]`` token, else 0.
    """
    tokenizer = Tokenizer.from_file(str(path))
    padding = tokenizer.padding
    pad_id = padding.get("pad_id") if padding else None
    if pad_id is None:
        pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer, int(pad_id or 0)


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass(frozen=True)
class PaddedBatch:
    """Token rows padded to the longest row of the batch: int64 [rows, longest] each."""

    input_ids: IdArray
    attention_mask: IdArray
    token_type_ids: IdArray

    @property
    def rows(self) -> int:
        """Rows in the batch."""
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        """Token slots per row (the longest row's length)."""
        return int(self.input_ids.shape[1])


class TextPipeline:
    """Tokenization, padding and pooling for one text-embedding model folder.

    Args:
        manifest: the model folder's manifest (:func:`worker.pipelines.manifest.load_manifest`).
        model_inputs: input names the ONNX model declares (feeds carry only these); default: all of
            :data:`MODEL_INPUTS`. Checked: ``input_ids`` must be among them, and no other names.
        model_outputs: output names the ONNX model declares; when given, the manifest's ``hidden_state``
            must be among them.
        max_length: tokens per row, special tokens included (default: the manifest's ``max_length``); at most
            the manifest's ``max_positions``.

    Raises:
        ManifestError: when the manifest does not describe a text-embedding model, ``max_length`` is out of
            range, or the model's inputs/outputs do not fit the pipeline.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        model_inputs: Collection[str] | None = None,
        model_outputs: Collection[str] | None = None,
        max_length: int | None = None,
    ) -> None:
        if manifest.pipeline != "text-embedding":
            raise ManifestError(f"{manifest.path}: pipeline {manifest.pipeline!r} is not text-embedding")
        max_length = manifest.max_length if max_length is None else max_length
        if not 3 <= max_length <= manifest.max_positions:
            raise ManifestError(
                f"{manifest.path}: max_length {max_length} is out of range; "
                f"this model takes 3 to {manifest.max_positions} tokens per row"
            )
        names = tuple(MODEL_INPUTS) if model_inputs is None else tuple(model_inputs)
        if "input_ids" not in names or not set(names) <= set(MODEL_INPUTS):
            raise ManifestError(
                f"{manifest.model_path}: model inputs {list(names)} do not fit a text model; "
                f"expected input_ids and optionally attention_mask, token_type_ids"
            )
        if model_outputs is not None and manifest.hidden_state not in model_outputs:
            raise ManifestError(
                f"{manifest.path}: field 'hidden_state' is {manifest.hidden_state!r}, "
                f"but the model's outputs are {list(model_outputs)}"
            )
        self.manifest = manifest
        self.max_length = max_length
        self.model_inputs = names
        self.tokenizer, self.pad_id = load_tokenizer(manifest.tokenizer_path, max_length=max_length)

    @classmethod
    def from_folder(
        cls,
        folder: Path | str,
        *,
        model_inputs: Collection[str] | None = None,
        model_outputs: Collection[str] | None = None,
        max_length: int | None = None,
    ) -> TextPipeline:
        """Load the manifest of ``folder`` and build the pipeline (arguments as for the constructor)."""
        return cls(load_manifest(folder), model_inputs=model_inputs, model_outputs=model_outputs, max_length=max_length)

    @property
    def text_input(self) -> str:
        """Name of the request's BYTES input."""
        return self.manifest.text_input

    @property
    def hidden_state(self) -> str:
        """Name of the model output to fetch."""
        return self.manifest.hidden_state

    @property
    def output(self) -> str:
        """Name of the reply's embedding output."""
        return self.manifest.output

    @property
    def dim(self) -> int:
        """Embedding width."""
        return self.manifest.dim

    def tokenize(self, texts: Sequence[str]) -> list[IdArray]:
        """Token ids of each text (special tokens included, truncated at ``max_length``), unpadded.

        ``len(row)`` of each result is the row's token count, which is what :func:`group_by_length` takes.
        """
        if not texts:
            return []
        encodings = self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=True)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def pad(self, rows: Sequence[IdArray]) -> PaddedBatch:
        """Pad tokenized rows to the longest of them."""
        ids, mask = pad_rows(rows, pad_id=self.pad_id)
        return PaddedBatch(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))

    def feeds(self, batch: PaddedBatch) -> dict[str, IdArray]:
        """The ONNX Runtime input feed of a batch: only the inputs the model declares."""
        return {name: getattr(batch, name) for name in self.model_inputs}

    def pool(self, hidden: npt.NDArray[np.floating[Any]], batch: PaddedBatch) -> FloatArray:
        """Embeddings of a batch from the model's hidden state [rows, tokens, dim]: float32 [rows, dim]."""
        if hidden.ndim != 3 or hidden.shape[:2] != batch.input_ids.shape or hidden.shape[2] != self.dim:
            raise ValueError(
                f"hidden state has shape {list(hidden.shape)}, expected [{batch.rows}, {batch.tokens}, {self.dim}]"
            )
        pooled = mean_pool(hidden, batch.attention_mask) if self.manifest.pooling == "mean" else cls_pool(hidden)
        return l2_normalize(pooled) if self.manifest.normalize else pooled

    def embed(
        self,
        texts: Sequence[str],
        run: Callable[[Mapping[str, IdArray]], npt.NDArray[np.floating[Any]]],
        *,
        max_rows: int = 64,
        group: bool = True,
    ) -> FloatArray:
        """Embed ``texts`` end to end, in their order: float32 [len(texts), dim].

        Args:
            texts: the strings.
            run: computes the hidden state of one feed, e.g.
                ``lambda feeds: session.run([pipeline.hidden_state], dict(feeds))[0]``.
            max_rows: most rows per model run.
            group: batch rows of similar length together (else in their given order).
        """
        rows = self.tokenize(texts)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if group:
            groups = group_by_length(token_counts(rows), max_rows)
        else:
            groups = [list(range(i, min(i + max_rows, len(rows)))) for i in range(0, len(rows), max_rows)]
        for indices in groups:
            batch = self.pad([rows[i] for i in indices])
            out[indices] = self.pool(run(self.feeds(batch)), batch)
        return out
