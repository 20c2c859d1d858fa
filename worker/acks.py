"""Ack policy: every ack, requeue and dead-letter decision is made here.

:func:`ack_action` maps what happened to a request onto what the broker is told, as a table.
:class:`AckLedger` turns many individual acks into few ``multiple=True`` acks without ever
acknowledging a delivery whose outcome is not yet known.
"""

from __future__ import annotations

import enum
from collections import OrderedDict


class Outcome(enum.Enum):
    """What happened to one delivery."""

    REPLIED = "replied"
    """Its reply (result or error) was confirmed by the broker."""
    REPLY_REFUSED = "reply_refused"
    """The broker refused or could not route its reply (e.g. a full results queue): keep the request,
    unacked, and publish the same reply again after a backoff."""
    REPLY_REFUSED_TOO_LONG = "reply_refused_too_long"
    """Its reply was refused for longer than the hold time, or the worker is draining: hand it back.
    Each hand-back counts towards the delivery limit, so this cannot loop forever."""
    REPLY_LOST = "reply_lost"
    """The reply could not be published (connection trouble): hand back so it is answered again."""
    REPLY_UNROUTABLE = "reply_unroutable"
    """The broker could not route its reply (``NO_ROUTE``: the results queue does not exist). That does
    not heal by retrying, so it is kept for inspection at once, never handed back as a suspect."""
    REPLY_TO_FATAL = "reply_to_fatal"
    """Publishing its reply alone closed the connection: a forged or stale direct reply-to address."""
    NO_REPLY_TO = "no_reply_to"
    """It has no reply_to, so no one can be answered: keep it for inspection."""
    BAD_REPLY_TO = "bad_reply_to"
    """Its reply_to is not one this worker answers (malformed, or a queue outside the allowed
    pattern): keep it for inspection, unanswered."""
    NOT_STARTED = "not_started"
    """The worker is draining and never started it: hand it to another worker."""


class AckAction(enum.Enum):
    """What the broker is told about one delivery."""

    ACK = "ack"
    REQUEUE = "requeue"
    DEAD_LETTER = "dead_letter"
    HOLD = "hold"
    """Tell the broker nothing yet: the delivery stays unacked (and in the prefetch window) while
    the worker retries its reply, so it is never acked without a stored reply."""


_POLICY: dict[Outcome, AckAction] = {
    Outcome.REPLIED: AckAction.ACK,
    Outcome.REPLY_REFUSED: AckAction.HOLD,
    Outcome.REPLY_REFUSED_TOO_LONG: AckAction.REQUEUE,
    Outcome.REPLY_LOST: AckAction.REQUEUE,
    Outcome.REPLY_UNROUTABLE: AckAction.DEAD_LETTER,
    Outcome.REPLY_TO_FATAL: AckAction.DEAD_LETTER,
    Outcome.NO_REPLY_TO: AckAction.DEAD_LETTER,
    Outcome.BAD_REPLY_TO: AckAction.DEAD_LETTER,
    Outcome.NOT_STARTED: AckAction.REQUEUE,
}


def ack_action(outcome: Outcome) -> AckAction:
    """The broker action for an outcome. Requeued deliveries count towards the quorum queue's
    delivery limit, so a request that can never be answered ends in the dead-letter queue."""
    return _POLICY[outcome]


REPLY_RETRY_FIRST_S = 0.05
REPLY_RETRY_MAX_S = 2.0


def reply_retry_delay_s(attempt: int) -> float:
    """Seconds to wait before publishing a refused reply again: doubles from 50 ms, at most 2 s,
    so a full results queue is polled gently instead of in a tight loop."""
    return min(REPLY_RETRY_FIRST_S * 2.0**attempt, REPLY_RETRY_MAX_S)


class AckLedger:
    """Outstanding delivery tags of one channel, in delivery order.

    ``settle(tags)`` marks deliveries ready to ack and returns the highest tag that can be acked
    with ``multiple=True``: the end of the run of settled tags at the front. Tags still being
    worked on hold back every later tag, so a multiple-ack never covers unfinished work.

    A *held* tag (its reply refused, retried later) may stay unsettled for seconds: the settled
    tags queued behind it are handed out by :meth:`take_singles` to be acked one by one, since a
    multiple-ack would cover the held one.
    """

    def __init__(self) -> None:
        self._open: OrderedDict[int, bool] = OrderedDict()
        self._held: set[int] = set()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, tag: int) -> None:
        """Record a new delivery (tags arrive in increasing order on one channel)."""
        self._open[tag] = False

    def discard(self, tag: int) -> None:
        """Forget a delivery that was settled on its own (requeued or dead-lettered)."""
        self._open.pop(tag, None)
        self._held.discard(tag)

    def hold(self, tag: int) -> None:
        """Mark an open delivery as held: not ready, and not expected to be soon."""
        if tag in self._open:
            self._held.add(tag)

    def release(self, tag: int) -> None:
        """End a hold; the tag is open again, to be settled or discarded as usual."""
        self._held.discard(tag)

    def take_singles(self) -> list[int]:
        """Remove and return the settled tags stuck behind held ones, to ack with ``multiple=False``.

        Only tags before the first open, not held tag qualify: a tag still being worked on holds
        everything behind it as usual, and becomes part of a multiple-ack once it settles.
        """
        if not self._held:
            return []
        singles: list[int] = []
        for tag, ready in list(self._open.items()):
            if ready:
                singles.append(tag)
            elif tag not in self._held:
                break
        for tag in singles:
            del self._open[tag]
        return singles

    def settle(self, tags: list[int]) -> int | None:
        """Mark ``tags`` ready to ack; return the tag to ack with ``multiple=True``, or None."""
        for tag in tags:
            if tag in self._open:
                self._open[tag] = True
        last: int | None = None
        while self._open:
            tag, ready = next(iter(self._open.items()))
            if not ready:
                break
            self._open.popitem(last=False)
            self._held.discard(tag)
            last = tag
        return last
