"""Load-test payloads decode as the worker will decode them."""

from __future__ import annotations

import random

import numpy as np
import pytest

from producer.loadtest.payloads import TEXT_LENGTH_MIX, PayloadSpec, build_bodies, sample_text
from producer.loadtest.profiles import LoadTestConfigError
from producer.wire.names import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK
from producer.wire.protocol import decode_request


@pytest.mark.parametrize("content_type", [CONTENT_TYPE_MSGPACK, CONTENT_TYPE_JSON])
def test_text_bodies_carry_one_string_per_row_in_the_text_input(content_type: str) -> None:
    bodies = build_bodies(PayloadSpec(kind="text", rows=3, content_type=content_type, variants=5))
    assert len(bodies) == 5
    for body in bodies:
        request = decode_request(body, content_type, default_id="cid")
        assert request.id == "cid"  # no id in the body: the worker uses the correlation id
        texts = request.inputs["text"]
        assert texts.shape == (3,)
        assert all(isinstance(t, str) and t for t in texts)


def test_tensor_bodies_have_the_rows_and_dims_asked_for() -> None:
    spec = PayloadSpec(kind="tensor", rows=4, input_name="a", datatype="INT64", dims=(2, 3), variants=2)
    for body in build_bodies(spec):
        array = decode_request(body, CONTENT_TYPE_MSGPACK).inputs["a"]
        assert array.shape == (4, 2, 3)
        assert array.dtype == np.int64


def test_bodies_repeat_for_a_seed() -> None:
    spec = PayloadSpec(kind="tensor", dims=(8,), variants=3, seed=5)
    assert build_bodies(spec) == build_bodies(spec)
    assert build_bodies(spec) != build_bodies(PayloadSpec(kind="tensor", dims=(8,), variants=3, seed=6))


def test_text_lengths_follow_the_mix() -> None:
    rng = random.Random(0)
    lengths = [len(sample_text(rng).split()) for _ in range(4000)]
    for share, fewest, most in TEXT_LENGTH_MIX:
        observed = sum(fewest <= n <= most for n in lengths) / len(lengths)
        assert observed == pytest.approx(share, abs=0.03)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"rows": 0}, "--rows"),
        ({"kind": "image"}, "--payload"),
        ({"kind": "tensor", "datatype": "BYTES"}, "--datatype"),
        ({"kind": "tensor", "dims": (0,)}, "--dims"),
        ({"content_type": "text/plain"}, "--content-type"),
    ],
)
def test_invalid_payload_options_fail_naming_the_option(options: dict[str, object], name: str) -> None:
    with pytest.raises(LoadTestConfigError, match=name):
        PayloadSpec(**options)  # type: ignore[arg-type]
