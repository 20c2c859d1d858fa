"""Request bodies for a load test: texts for the default (text-embedding) model, or random tensors.

Pure. Bodies are encoded once, before the run, without an ``id`` (the worker then uses the AMQP
``correlation_id``), so sending costs the generator no encoding time; the runner cycles through them.

Texts follow a length mix that resembles what an embedding service sees (see :data:`TEXT_LENGTH_MIX`):
mostly short queries, many sentences, some paragraphs long enough to hit the worker's token limit.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Literal

import numpy as np

from producer.loadtest.profiles import LoadTestConfigError
from producer.wire.names import CONTENT_TYPE_MSGPACK, CONTENT_TYPES
from producer.wire.protocol import DATATYPES, encode_request

PayloadKind = Literal["text", "tensor"]

# (share of rows, fewest words, most words). About 1.3 tokens per word for this vocabulary.
TEXT_LENGTH_MIX: tuple[tuple[float, int, int], ...] = (
    (0.50, 3, 12),  # search queries, titles
    (0.35, 15, 40),  # sentences, short reviews
    (0.15, 60, 200),  # paragraphs; the longest pass the default 256-token limit and are truncated
)

_VOCABULARY = (
    "the of and to in is for on that with as by this from at are be or an it was not which have can all "
    "more new will one about time data model service queue request reply worker batch latency system user "
    "order price shipping return delivery product quality support account payment card refund issue "
    "question answer search result page report team project release update version change fix error "
    "performance memory network storage cluster node scale load peak night morning week month year city "
    "travel hotel flight room food coffee music movie book story review great good bad slow fast easy hard "
    "help need want find use make work run build test check learn read write send receive open close "
    "start stop keep move show tell ask give take bring leave come go think know feel look seem become "
    "customer manager engineer doctor teacher student driver market company office school hospital store"
)
_WORDS = _VOCABULARY.split()


@dataclasses.dataclass(frozen=True, kw_only=True)
class PayloadSpec:
    """What each request carries.

    Args:
        kind: ``text`` (a BYTES input, one string per row) or ``tensor`` (random numbers).
        rows: rows per request (first dimension).
        input_name: the model input's name (default ``text`` for text, ``x`` for tensors).
        datatype: OIP datatype of a tensor input (tensor payloads).
        dims: dimensions of one row of a tensor input, e.g. ``(16,)`` for ``[rows, 16]`` (tensor payloads).
        content_type: ``application/msgpack`` (default) or ``application/json``.
        variants: how many distinct bodies to pre-encode and cycle through.
        seed: seed of the texts and numbers.
    """

    kind: PayloadKind = "text"
    rows: int = 1
    input_name: str = ""
    datatype: str = "FP32"
    dims: tuple[int, ...] = ()
    content_type: str = CONTENT_TYPE_MSGPACK
    variants: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("text", "tensor"):
            raise LoadTestConfigError(f"--payload is {self.kind!r}; allowed: text, tensor")
        if not 1 <= self.rows <= 65536:
            raise LoadTestConfigError(f"--rows is {self.rows}; it must be between 1 and 65536")
        if self.content_type not in CONTENT_TYPES:
            raise LoadTestConfigError(f"--content-type is {self.content_type!r}; allowed: {', '.join(CONTENT_TYPES)}")
        if not 1 <= self.variants <= 100_000:
            raise LoadTestConfigError(f"variants is {self.variants}; it must be between 1 and 100000")
        if self.kind == "tensor":
            if self.datatype not in DATATYPES or self.datatype == "BYTES":
                allowed = ", ".join(d for d in DATATYPES if d != "BYTES")
                raise LoadTestConfigError(f"--datatype is {self.datatype!r}; allowed for tensors: {allowed}")
            if any(d < 1 for d in self.dims):
                raise LoadTestConfigError(f"--dims {self.dims} has a dimension below 1")

    @property
    def name(self) -> str:
        """The input name requests carry."""
        return self.input_name or ("text" if self.kind == "text" else "x")

    def describe(self) -> str:
        """One line for the report."""
        if self.kind == "text":
            what = f"text ({self.name}: BYTES [{self.rows}]), mixed lengths"
        else:
            shape = ", ".join(str(d) for d in (self.rows, *self.dims))
            what = f"tensor ({self.name}: {self.datatype} [{shape}])"
        return f"{what}, {self.rows} row(s) per request, {self.content_type}"


def sample_text(rng: random.Random) -> str:
    """One text drawn from :data:`TEXT_LENGTH_MIX`."""
    pick = rng.random()
    fewest, most = TEXT_LENGTH_MIX[-1][1:]
    for share, low, high in TEXT_LENGTH_MIX:
        if pick < share:
            fewest, most = low, high
            break
        pick -= share
    words = rng.choices(_WORDS, k=rng.randint(fewest, most))
    return " ".join(words).capitalize() + "."


def _tensor(rng: np.random.Generator, datatype: str, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    dtype = DATATYPES[datatype]
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    high = min(100, int(np.iinfo(dtype).max))
    return rng.integers(0, high, shape).astype(dtype)


def build_bodies(spec: PayloadSpec) -> list[bytes]:
    """``spec.variants`` encoded request bodies, deterministic for a given spec."""
    rng = random.Random(spec.seed)
    nrng = np.random.default_rng(spec.seed)
    bodies = []
    for _ in range(spec.variants):
        if spec.kind == "text":
            inputs: dict[str, Any] = {spec.name: [sample_text(rng) for _ in range(spec.rows)]}
        else:
            inputs = {spec.name: _tensor(nrng, spec.datatype, (spec.rows, *spec.dims))}
        bodies.append(encode_request(inputs, spec.content_type))
    return bodies
