"""The bulk job's state file: its secret and the model version it is pinned to, beside the output.

Owns ``<output name>.job.json`` (mode 0600): the random secret that signs the job's request ids
(:mod:`producer.bulk.signed_ids`) and, with a model, the version the job is pinned to, so a rerun keeps it.
:class:`JobState` is what the job (:mod:`producer.bulk.job`) and its reply handling
(:mod:`producer.bulk.replies`) use: the secret, checked for privacy, and the pinned version. Files only,
nothing here talks to the broker.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

from producer.amqp.logs import get_logger
from producer.bulk.options import BulkSummary, JobFailedError
from producer.wire.errors import InferenceError

__all__ = [
    "STATE_FILE_SUFFIX",
    "JobState",
    "JobStateError",
    "is_private",
    "load_or_create_secret",
    "pinned_version",
    "record_pinned_version",
    "state_path",
]

log = get_logger("bulk")

STATE_FILE_SUFFIX = ".job.json"
SECRET_BYTES = 32
_STATE_VERSION = 1


class JobStateError(InferenceError):
    """Raised when a bulk job's state file cannot be read or created."""


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


class JobState:
    """One run's view of its job's state file: the secret, and the model version the job is pinned to.

    Args:
        output_path: the job's output; the state file lies beside it (:func:`state_path`).
        job_id: for log events and messages.
        model: the job's model (None: a queue, no version to pin).
        version: the version asked for (``--version``), else None until the first reply names one.
        summary: gets the pinned version (``model_version``).

    Raises from every method: JobFailedError, with what to do.
    """

    def __init__(
        self, output_path: Path, job_id: str, *, model: str | None, version: str | None, summary: BulkSummary
    ) -> None:
        self.path = state_path(output_path)
        self.job_id = job_id
        self.model = model
        self.version = version
        self._summary = summary

    def secret(self) -> bytes:
        """The job's secret, created on the first run; a state file others may read is warned about."""
        try:
            secret, created = load_or_create_secret(self.path)
        except JobStateError as e:
            raise JobFailedError(str(e)) from e
        if created:
            log.info("bulk_state_created", job_id=self.job_id, path=str(self.path))
        elif not is_private(self.path):
            log.warning(
                "bulk_state_readable_by_others",
                job_id=self.job_id,
                path=str(self.path),
                why="whoever can read the job's secret can forge replies the job accepts",
                fix=f"chmod 600 {self.path}",
            )
        return secret

    def pin_recorded_version(self) -> None:
        """Pin the job to the version an earlier run recorded; a different --version is refused."""
        if self.model is None:
            return
        recorded = pinned_version(self.path)
        if recorded is None:
            if self.version is not None:
                self.record_version(self.version)
            return
        if self.version is not None and self.version != recorded:
            raise JobFailedError(
                f"job {self.job_id} is pinned to version {recorded} of model {self.model} (its output holds "
                f"that version's results): rerun with --version {recorded}, or write a new output for version "
                f"{self.version}"
            )
        self.version = recorded
        self._summary.model_version = recorded

    def record_version(self, version: str) -> None:
        """Pin the job to ``version`` (the first reply's) and record it for later runs."""
        self.version = self._summary.model_version = version
        try:
            record_pinned_version(self.path, version)
        except JobStateError as e:
            raise JobFailedError(str(e)) from e
        log.info("bulk_version_pinned", job_id=self.job_id, model=self.model, version=version)
