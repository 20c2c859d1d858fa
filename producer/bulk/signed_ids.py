"""Request ids a bulk job can verify: a reply counts only if it answers a request the job sent.

Anyone allowed to publish to the default exchange can put a message into a job's results queue.
So each job has a secret (random, kept in a state file beside the output, mode 0600), and every
request id carries an HMAC of the job id, the request's serial and its rows under that secret:

    correlation_id = <job id>.<serial>.<tag>
    body id        = <correlation_id>:<JSON [[line, row id], ...]>
    tag            = first 16 bytes of HMAC-SHA256(secret, job id, serial, rows JSON), hex

Workers echo both (the AMQP ``correlation_id`` and the body's ``id``), so any run of the job, the
one that sent the request or a later one resuming it, checks a reply without remembering every
id it sent, and nobody without the secret can make up a reply that names rows of the job.

Pure: files and bytes only, nothing here talks to the broker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from producer.bulk.jsonl import Row, decode_body_id, encode_row_keys
from producer.wire.errors import InferenceError

__all__ = [
    "STATE_FILE_SUFFIX",
    "JobStateError",
    "RequestSigner",
    "SignedIds",
    "UnverifiedReplyError",
    "is_private",
    "load_or_create_secret",
    "pinned_version",
    "record_pinned_version",
    "state_path",
]

STATE_FILE_SUFFIX = ".job.json"
SECRET_BYTES = 32
TAG_BYTES = 16
_STATE_VERSION = 1
_MAC_CONTEXT = b"qinfer-bulk-request-v1"
_MAX_CORRELATION_ID_CHARS = 255  # AMQP shortstr


class JobStateError(InferenceError):
    """Raised when a bulk job's state file cannot be read or created."""


class UnverifiedReplyError(InferenceError):
    """Raised when nothing proves that a reply answers a request this job sent."""


def state_path(output_path: Path) -> Path:
    """The state file of the job writing ``output_path``: beside it, ``<output name>.job.json``."""
    return output_path.with_name(output_path.name + STATE_FILE_SUFFIX)


def load_or_create_secret(path: Path) -> tuple[bytes, bool]:
    """The job's secret from its state file, creating the file (mode 0600) on the first run.

    The caller must hold the job's output lock, so two runs never create the file at once.

    Returns:
        ``(secret, created)``: ``created`` is True when this call made a new secret.

    Raises:
        JobStateError: the file exists but is not a state file this version can read, or
            cannot be created; the message says what to do.
    """
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return _create_state(path), True
    except OSError as e:
        raise JobStateError(f"cannot read the job's state file {path}: {e.strerror}") from e
    try:
        state = json.loads(text)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"version {state.get('version')!r}, expected {_STATE_VERSION}")
        secret = bytes.fromhex(state["secret"])
        if len(secret) < 16:
            raise ValueError("secret shorter than 16 bytes")
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise JobStateError(
            f"the job's state file {path} is damaged ({e}); delete it to go on: replies that earlier runs "
            "left in the results queue are then dropped as unverifiable and their rows sent again"
        ) from e
    return secret, False


def is_private(path: Path) -> bool:
    """True when no one but the owner may read or write ``path``."""
    return path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO) == 0


def _create_state(path: Path) -> bytes:
    secret = secrets.token_bytes(SECRET_BYTES)
    _write_state(path, {"version": _STATE_VERSION, "secret": secret.hex()}, "create")
    return secret


def pinned_version(path: Path) -> str | None:
    """The model version the job is pinned to, as recorded in its state file (None: not recorded yet)."""
    try:
        version = json.loads(path.read_bytes()).get("model_version")
    except (OSError, ValueError, AttributeError):
        return None
    return version if isinstance(version, str) else None


def record_pinned_version(path: Path, version: str) -> None:
    """Record in the job's state file the model version its first reply came from, so reruns keep it.

    Raises:
        JobStateError: the state file cannot be read or rewritten.
    """
    try:
        state = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise JobStateError(f"cannot read the job's state file {path}: {e}") from e
    _write_state(path, {**state, "model_version": version}, "update")


def _write_state(path: Path, state: dict[str, object], what: str) -> None:
    text = json.dumps(state).encode() + b"\n"
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file left by a crashed run
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise JobStateError(f"cannot {what} the job's state file {path}: {e.strerror}") from e


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
