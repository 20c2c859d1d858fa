"""Bulk request ids: what makes a reply count (HMAC-tagged ids) and the state file that holds the secret."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest

from producer.bulk.jsonl import Row
from producer.bulk.signed_ids import RequestSigner, UnverifiedReplyError
from producer.bulk.state import JobStateError, is_private, load_or_create_secret, state_path

SECRET = bytes(range(32))


def _rows(*ids: str) -> list[Row]:
    return [Row(line=i + 1, id=row_id, inputs={"x": np.zeros(4, np.float32)}) for i, row_id in enumerate(ids)]


def test_a_signed_request_verifies_and_names_its_rows() -> None:
    signer = RequestSigner(SECRET, "job-1")
    ids = signer.sign("ab12cd34.7", _rows("r1", "r2"))
    assert ids.correlation_id.startswith("job-1.ab12cd34.7.")
    assert ids.body_id.startswith(ids.correlation_id + ":")
    assert signer.verify(ids.correlation_id, ids.body_id) == [(1, "r1"), (2, "r2")]


def test_another_run_of_the_job_verifies_with_the_same_secret() -> None:
    ids = RequestSigner(SECRET, "job-1").sign("n.1", _rows("r1"))
    assert RequestSigner(bytes(SECRET), "job-1").verify(ids.correlation_id, ids.body_id) == [(1, "r1")]


@pytest.mark.parametrize(
    ("signer", "match"),
    [
        (RequestSigner(b"x" * 32, "job.a"), "tag does not match"),
        (RequestSigner(SECRET, "job-2"), "another job"),
        (RequestSigner(SECRET, "job.a.b"), "another job"),
        (RequestSigner(SECRET, "job"), "tag does not match"),  # "job.a" reads as job "job", serial "a.n.1"
    ],
)
def test_a_reply_signed_under_another_secret_or_job_does_not_verify(signer: RequestSigner, match: str) -> None:
    ids = RequestSigner(SECRET, "job.a").sign("n.1", _rows("r1"))
    with pytest.raises(UnverifiedReplyError, match=match):
        signer.verify(ids.correlation_id, ids.body_id)


def test_rows_swapped_into_a_genuine_id_do_not_verify() -> None:
    signer = RequestSigner(SECRET, "job-1")
    ids = signer.sign("n.1", _rows("r1"))
    forged_body_id = ids.correlation_id + ':[[1,"r999"]]'
    with pytest.raises(UnverifiedReplyError, match="tag does not match"):
        signer.verify(ids.correlation_id, forged_body_id)


@pytest.mark.parametrize(
    ("correlation_id", "body_id", "match"),
    [
        (None, 'job-1.n.1.00:[[1,"r1"]]', "no correlation id"),
        ("job-1.n.1.00", "job-1.n.1.00", "names no rows"),
        ("job-1.n.2.00", 'job-1.n.1.00:[[1,"r1"]]', "disagree"),
        ("job-1.00", 'job-1.00:[[1,"r1"]]', "another job"),
        ("other.n.1.00", 'other.n.1.00:[[1,"r1"]]', "another job"),
        ("job-1.n.1.00", 'job-1.n.1.00:[[1,"r1"]]', "tag does not match"),
    ],
)
def test_replies_without_a_valid_tag_are_refused_with_the_reason(
    correlation_id: str | None, body_id: str, match: str
) -> None:
    with pytest.raises(UnverifiedReplyError, match=match):
        RequestSigner(SECRET, "job-1").verify(correlation_id, body_id)


def test_the_correlation_id_and_body_id_must_agree_even_when_both_are_genuine() -> None:
    signer = RequestSigner(SECRET, "job-1")
    first, second = signer.sign("n.1", _rows("r1")), signer.sign("n.2", _rows("r2"))
    with pytest.raises(UnverifiedReplyError, match="disagree"):
        signer.verify(first.correlation_id, second.body_id)


def test_serials_that_would_break_the_id_format_are_refused() -> None:
    signer = RequestSigner(SECRET, "job-1")
    for serial in ("", "a:b"):
        with pytest.raises(ValueError, match="serial"):
            signer.sign(serial, _rows("r1"))


def test_an_id_longer_than_amqp_allows_is_refused() -> None:
    with pytest.raises(ValueError, match="shorten the job id"):
        RequestSigner(SECRET, "j" * 200).sign("n" * 30 + ".1", _rows("r1"))


def test_the_state_file_is_created_private_once_and_reused(tmp_path: Path) -> None:
    path = state_path(tmp_path / "out.jsonl")
    assert path == tmp_path / "out.jsonl.job.json"
    secret, created = load_or_create_secret(path)
    assert created
    assert len(secret) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert is_private(path)
    assert load_or_create_secret(path) == (secret, False)
    assert list(tmp_path.iterdir()) == [path], "a temporary file was left behind"


def test_a_state_file_readable_by_others_is_reported(tmp_path: Path) -> None:
    path = state_path(tmp_path / "out.jsonl")
    load_or_create_secret(path)
    path.chmod(0o644)
    assert not is_private(path)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        json.dumps({"version": 2, "secret": "00" * 32}),
        json.dumps({"version": 1, "secret": "zz"}),
        json.dumps({"version": 1, "secret": "00" * 4}),
        json.dumps({"version": 1}),
        json.dumps([1]),
    ],
)
def test_a_damaged_state_file_stops_the_job_and_says_what_to_do(tmp_path: Path, text: str) -> None:
    path = state_path(tmp_path / "out.jsonl")
    path.write_text(text)
    with pytest.raises(JobStateError, match=r"is damaged .* delete it to go on"):
        load_or_create_secret(path)
