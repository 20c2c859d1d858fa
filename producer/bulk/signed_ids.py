"""Request ids a bulk job can verify: a reply counts only if it answers a request the job sent.

Anyone allowed to publish to the default exchange can put a message into a job's results queue.
So each job has a secret (random, kept in the job's state file beside the output, mode 0600), and every
request id carries an HMAC of the job id, the request's serial and its rows under that secret:

    correlation_id = <job id>.<serial>.<tag>
    body id        = <correlation_id>:<JSON [[line, row id], ...]>
    tag            = first 16 bytes of HMAC-SHA256(secret, job id, serial, rows JSON), hex

Workers echo both (the AMQP ``correlation_id`` and the body's ``id``), so any run of the job, the
one that sent the request or a later one resuming it, checks a reply without remembering every
id it sent, and nobody without the secret can make up a reply that names rows of the job.

The body id names its rows, so a reply that arrives after a restart (when the producer no longer
knows what it sent) still maps back to them. Owns both ids' format, signing and checking; the secret comes from
the state file (:mod:`producer.bulk.state`). Used by the bulk job (signing) and its reply handling
(:mod:`producer.bulk.replies`, checking). Pure: strings and bytes only, nothing here talks to the broker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Sequence

import msgspec

from producer.bulk.jsonl import Row
from producer.wire.errors import InferenceError

__all__ = [
    "RequestSigner",
    "SignedIds",
    "UnverifiedReplyError",
    "decode_body_id",
    "encode_body_id",
    "encode_row_keys",
]

TAG_BYTES = 16
_MAC_CONTEXT = b"qinfer-bulk-request-v1"
_MAX_CORRELATION_ID_CHARS = 255  # AMQP shortstr

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


class UnverifiedReplyError(InferenceError):
    """Raised when nothing proves that a reply answers a request this job sent."""


def encode_row_keys(rows: Sequence[Row]) -> str:
    """The rows' ``(line, id)`` pairs as the JSON text ``[[line, row id], ...]`` body ids carry."""
    return _encoder.encode([[r.line, r.id] for r in rows]).decode()


def encode_body_id(request_id: str, rows: Sequence[Row]) -> str:
    """``<request id>:<JSON [[line, row id], ...]>``; ``request_id`` must not contain ``:``."""
    if ":" in request_id:
        raise ValueError(f"request id {request_id!r} must not contain ':'")
    return f"{request_id}:{encode_row_keys(rows)}"


def decode_body_id(body_id: str) -> list[tuple[int, str]] | None:
    """The ``(line, row id)`` pairs :func:`encode_body_id` packed, or ``None`` when ``body_id`` has none."""
    _, sep, rows_json = body_id.partition(":")
    if not sep:
        return None
    try:
        pairs = _decoder.decode(rows_json)
    except msgspec.DecodeError:
        return None
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and isinstance(p[1], str) for p in pairs
    ):
        return None
    return [(p[0], p[1]) for p in pairs]


@dataclasses.dataclass(frozen=True, slots=True)
class SignedIds:
    """The two ids one request carries: the AMQP ``correlation_id`` and the body's ``id``."""

    correlation_id: str
    body_id: str


class RequestSigner:
    """Makes the ids of one job's requests and checks the ids of the replies to them.

    Args:
        secret: the job's secret (:func:`load_or_create_secret`).
        job_id: the job's id; a reply to another job's request does not verify.
    """

    def __init__(self, secret: bytes, job_id: str) -> None:
        self._secret = secret
        self.job_id = job_id

    def _tag(self, serial: str, rows_json: str) -> str:
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        for part in (_MAC_CONTEXT, self.job_id.encode(), serial.encode(), rows_json.encode()):
            mac.update(len(part).to_bytes(4, "big"))
            mac.update(part)
        return mac.digest()[:TAG_BYTES].hex()

    def sign(self, serial: str, rows: Sequence[Row]) -> SignedIds:
        """The ids of a request carrying ``rows``.

        Args:
            serial: unique among the job's requests (all runs); letters, digits and ``.`` only.
            rows: the request's rows, in the order of its first dimension.
        """
        if not serial or ":" in serial:
            raise ValueError(f"serial {serial!r} must be non-empty and must not contain ':'")
        rows_json = encode_row_keys(rows)
        correlation_id = f"{self.job_id}.{serial}.{self._tag(serial, rows_json)}"
        if len(correlation_id) > _MAX_CORRELATION_ID_CHARS:
            raise ValueError(f"a correlation id of {len(correlation_id)} chars (AMQP allows 255): shorten the job id")
        return SignedIds(correlation_id=correlation_id, body_id=f"{correlation_id}:{rows_json}")

    def verify(self, correlation_id: str | None, body_id: str) -> list[tuple[int, str]]:
        """The ``(line, row id)`` pairs a reply answers, once its ids prove the job sent the request.

        Args:
            correlation_id: the reply's AMQP ``correlation_id``.
            body_id: the reply body's ``id`` (workers echo the request's).

        Raises:
            UnverifiedReplyError: the ids disagree, belong to another job, carry no rows,
                or their tag is not this job's; the message says which.
        """
        if not correlation_id:
            raise UnverifiedReplyError("the reply has no correlation id")
        named, sep, rows_json = body_id.partition(":")
        if not sep:
            raise UnverifiedReplyError("the reply's body id names no rows")
        if named != correlation_id:
            raise UnverifiedReplyError("the reply's correlation id and body id disagree")
        prefix, _, tag = correlation_id.rpartition(".")
        job_prefix = f"{self.job_id}."
        if not prefix.startswith(job_prefix) or len(prefix) == len(job_prefix):
            raise UnverifiedReplyError("the reply names a request of another job")
        serial = prefix[len(job_prefix) :]
        if not hmac.compare_digest(tag.encode(), self._tag(serial, rows_json).encode()):
            raise UnverifiedReplyError("the reply's tag does not match (not signed with this job's secret)")
        rows = decode_body_id(body_id)
        if rows is None:
            raise UnverifiedReplyError("the reply's rows cannot be decoded")
        return rows
