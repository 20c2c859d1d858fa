"""Which ``reply_to`` addresses a worker answers, decided before any work is spent. Pure: no I/O.

A request's ``reply_to`` comes from whoever published it, so it is hostile input like the body:

* A **queue name** is answered only when it matches the configured pattern in full (by default the
  project's own bulk results queues, ``results.<job id>``, and the queues the broker names,
  ``amq.gen-`` and 22 characters, which RPC clients written as in RabbitMQ's tutorial declare as
  their exclusive reply queue). Anything else could be another job's results queue or another
  service's work queue: the request is dead-lettered unanswered rather than written into a
  stranger's queue. A permitted queue that does not exist (the client is gone) makes the broker
  return the reply (``NO_ROUTE``), which is permanent: the request is dead-lettered, never retried.
* A **direct reply-to address** (``amq.rabbitmq.reply-to.<pid>.<key>``) is issued by the broker, but a
  publisher can write one by hand. RabbitMQ 3.x closes the *whole publishing connection*
  (``INTERNAL_ERROR``) when a reply goes to an address whose pid part does not decode to a live
  node's process, failing every reply in flight beside it. :func:`classify` checks the address's
  structure (base64 of an Erlang external-term pid, then a key) and returns the pid part, so the
  replier can publish the first reply to each pid on a connection of its own (see
  ``worker.reply_publisher``) and trust the pid once the broker accepted it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import re
import struct

from producer.wire.names import DIRECT_REPLY_TO

MAX_REPLY_TO_CHARS = 255  # an AMQP short string; nothing longer can be a routing key

_DIRECT_PREFIX = DIRECT_REPLY_TO + "."
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")

# Erlang external term format: version 131, then a pid (NEW_PID_EXT 'X' or PID_EXT 'g') whose node is an atom.
_VERSION = 131
_NEW_PID_EXT = 88  # node, id u32, serial u32, creation u32
_PID_EXT = 103  # node, id u32, serial u32, creation u8
_ATOM_TAGS = {118: 2, 100: 2, 119: 1, 115: 1}  # ATOM_UTF8_EXT, ATOM_EXT (u16 length); SMALL_ variants (u8)


class ReplyToKind(enum.Enum):
    """How a reply is delivered, or why it is not."""

    DIRECT = "direct"
    """A direct reply-to address: published without ``mandatory`` (at-most-once RPC)."""
    QUEUE = "queue"
    """A queue allowed by the pattern: published ``mandatory`` and persistent."""
    MISSING = "missing"
    """No reply_to: nobody can be answered."""
    REJECTED = "rejected"
    """A reply_to this worker does not answer (``reason`` says why)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ReplyTo:
    """A classified reply_to.

    Attributes:
        kind: see :class:`ReplyToKind`.
        address: the routing key to publish the reply with ("" unless DIRECT or QUEUE).
        pid: for DIRECT, the encoded pid part: replies to one pid succeed or fail together.
        reason: for REJECTED, a sentence for the log line.
    """

    kind: ReplyToKind
    address: str = ""
    pid: str = ""
    reason: str = ""

    @property
    def answerable(self) -> bool:
        return self.kind in (ReplyToKind.DIRECT, ReplyToKind.QUEUE)


def _is_pid_term(raw: bytes) -> bool:
    """True when ``raw`` is exactly one Erlang pid in external term format."""
    if len(raw) < 4 or raw[0] != _VERSION or raw[1] not in (_NEW_PID_EXT, _PID_EXT):
        return False
    atom_tag = raw[2]
    width = _ATOM_TAGS.get(atom_tag)
    if width is None:
        return False
    start = 3 + width
    if len(raw) < start:
        return False
    length = int(struct.unpack(">H" if width == 2 else ">B", raw[3:start])[0])
    node = raw[start : start + length]
    if len(node) != length or b"@" not in node:
        return False
    tail = 12 if raw[1] == _NEW_PID_EXT else 9
    return len(raw) == start + length + tail


def direct_reply_pid(reply_to: str) -> str | None:
    """The pid part of a well-formed direct reply-to address, or None when it is not one."""
    if not reply_to.startswith(_DIRECT_PREFIX):
        return None
    pid, dot, key = reply_to[len(_DIRECT_PREFIX) :].partition(".")
    if not dot or not key or not _BASE64.fullmatch(pid):
        return None
    try:
        raw = base64.b64decode(pid + "=" * (-len(pid) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return pid if _is_pid_term(raw) else None


def classify(reply_to: str | None, queue_pattern: re.Pattern[str]) -> ReplyTo:
    """Decide whether and how a request's ``reply_to`` is answered.

    Args:
        reply_to: the AMQP ``reply_to`` property as received.
        queue_pattern: compiled ``WORKER_REPLY_TO_PATTERN``; a queue name must match it in full.
    """
    if not reply_to:
        return ReplyTo(ReplyToKind.MISSING, reason="the request has no reply_to, so its result could not be delivered")
    if len(reply_to) > MAX_REPLY_TO_CHARS:
        return ReplyTo(ReplyToKind.REJECTED, reason=f"reply_to is {len(reply_to)} characters, longer than AMQP allows")
    if reply_to.startswith(DIRECT_REPLY_TO):
        pid = direct_reply_pid(reply_to)
        if pid is None:
            return ReplyTo(
                ReplyToKind.REJECTED,
                reason="reply_to starts like a direct reply-to address but is not one the broker issued",
            )
        return ReplyTo(ReplyToKind.DIRECT, address=reply_to, pid=pid)
    if queue_pattern.fullmatch(reply_to):
        return ReplyTo(ReplyToKind.QUEUE, address=reply_to)
    return ReplyTo(
        ReplyToKind.REJECTED,
        reason="reply_to names a queue this worker does not answer (it does not match WORKER_REPLY_TO_PATTERN)",
    )
