"""reply_to classification: what a worker answers, decided before any work."""

from __future__ import annotations

import base64
import re

import pytest

from producer.wire.names import DEFAULT_REPLY_TO_PATTERN, DIRECT_REPLY_TO, RESULTS_QUEUE_PATTERN
from worker.reply_to import ReplyToKind, classify, direct_reply_pid

PATTERN = re.compile(DEFAULT_REPLY_TO_PATTERN)
# As RabbitMQ 3.10 issues them: base64 of a NEW_PID_EXT term on node 'reply@<hash>', then a key.
ISSUED = "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAADswAAAABrC2eU.T9Ru4iuZB8E4l1Y0TtnQDQ=="


def _direct(term: bytes, key: str = "a2V5") -> str:
    return f"{DIRECT_REPLY_TO}.{base64.b64encode(term).decode()}.{key}"


def test_a_broker_issued_direct_reply_to_is_answered_and_its_pid_named() -> None:
    target = classify(ISSUED, PATTERN)
    assert (target.kind, target.address) == (ReplyToKind.DIRECT, ISSUED)
    assert target.pid == "g1h2AA1yZXBseUA5MjQ4ODg0AAADswAAAABrC2eU"


def test_the_old_pid_ext_form_and_small_atoms_are_accepted() -> None:
    old = b"\x83g" + b"s\x0brabbit@host" + bytes(9)  # PID_EXT with SMALL_ATOM_EXT
    assert direct_reply_pid(_direct(old)) is not None


@pytest.mark.parametrize(
    "reply_to",
    [
        f"{DIRECT_REPLY_TO}.garbage",
        f"{DIRECT_REPLY_TO}.g2gDZA.eA==",  # a tuple, not a pid: RabbitMQ closes the connection for it
        f"{DIRECT_REPLY_TO}.g1h2AA1yZXBseUA5MjQ4ODg0AAADswAAAABrC2eU",  # no key
        f"{DIRECT_REPLY_TO}.!!!.key",
        _direct(b"\x83Xv\x00\x0crabbit@host1" + bytes(11)),  # one byte short
        _direct(b"\x83Xv\x00\x0crabbit@host1" + bytes(13)),  # one byte long
        _direct(b"\x83Xv\x00\x0crabbithost12" + bytes(12)),  # a node name without '@'
        DIRECT_REPLY_TO + "x" * 300,
    ],
)
def test_malformed_direct_reply_to_addresses_are_rejected(reply_to: str) -> None:
    assert classify(reply_to, PATTERN).kind is ReplyToKind.REJECTED


def test_plain_direct_reply_to_pseudo_queue_is_rejected_as_it_is_never_a_real_address() -> None:
    assert classify(DIRECT_REPLY_TO, PATTERN).kind is ReplyToKind.REJECTED


@pytest.mark.parametrize(
    ("reply_to", "kind"),
    [
        ("results.job-1", ReplyToKind.QUEUE),
        ("results.2026-11-28_a.b:c", ReplyToKind.QUEUE),
        ("results.", ReplyToKind.REJECTED),
        ("inference", ReplyToKind.REJECTED),
        ("someone.results.job", ReplyToKind.REJECTED),
        ("results.job\n", ReplyToKind.REJECTED),
        (None, ReplyToKind.MISSING),
        ("", ReplyToKind.MISSING),
    ],
)
def test_queue_names_must_match_the_pattern_in_full(reply_to: str | None, kind: ReplyToKind) -> None:
    target = classify(reply_to, PATTERN)
    assert target.kind is kind
    assert target.answerable is (kind is ReplyToKind.QUEUE)
    if not target.answerable:
        assert target.reason


def test_a_custom_pattern_widens_what_is_answered() -> None:
    assert classify("replies.service-a", re.compile(r"replies\.[a-z-]+")).kind is ReplyToKind.QUEUE


# As RabbitMQ 3.10 names a queue declared with an empty name: amq.gen- and 22 URL-safe base64 characters.
SERVER_NAMED = ["amq.gen-BOpe64EWmbZmx8YplNbwng", "amq.gen-9t2jCo3ZWDLITa4JiK-Uig", "amq.gen-qE_Z2ZLH0-PKwbb296M7VA"]


@pytest.mark.parametrize("reply_to", SERVER_NAMED)
def test_a_queue_the_broker_named_is_answered_by_default(reply_to: str) -> None:
    target = classify(reply_to, PATTERN)
    assert (target.kind, target.address) == (ReplyToKind.QUEUE, reply_to)


@pytest.mark.parametrize(
    "reply_to",
    [
        "amq.gen-",
        "amq.gen-BOpe64EWmbZmx8YplNbwn",  # 21 characters
        "amq.gen-BOpe64EWmbZmx8YplNbwngg",  # 23
        "amq.gen-BOpe64EWmbZmx8YplNb+/g",  # standard base64, which the broker does not use
        "amq.gen-BOpe64EWmbZmx8Ypl.bwng",
        "amq.gen-BOpe64EWmbZmx8YplNbwng\n",
        "amq.gen-BOpe64EWmbZmx8YplNbwng.results.job",
        "amq.genBOpe64EWmbZmx8YplNbwng",
        "amq.gen.BOpe64EWmbZmx8YplNbwng",
        "amq.direct",
        "prefix.amq.gen-BOpe64EWmbZmx8YplNbwng",
        "inference",  # another service's work queue
        "orders.work",
    ],
)
def test_names_that_only_look_server_named_and_other_services_queues_are_refused(reply_to: str) -> None:
    target = classify(reply_to, PATTERN)
    assert target.kind is ReplyToKind.REJECTED
    assert "WORKER_REPLY_TO_PATTERN" in target.reason


def test_a_custom_pattern_can_leave_server_named_queues_out() -> None:
    assert classify(SERVER_NAMED[0], re.compile(RESULTS_QUEUE_PATTERN)).kind is ReplyToKind.REJECTED
    assert classify("results.job-1", re.compile(RESULTS_QUEUE_PATTERN)).kind is ReplyToKind.QUEUE
