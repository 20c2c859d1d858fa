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
    """The broker refused or could not route its reply (e.g. a full results queue): try again later."""
    REPLY_LOST = "reply_lost"
    """The reply could not be published (connection trouble): hand back so it is answered again."""
    NO_REPLY_TO = "no_reply_to"
    """It has no reply_to, so no one can be answered: keep it for inspection."""
    NOT_STARTED = "not_started"
    """The worker is draining and never started it: hand it to another worker."""


class AckAction(enum.Enum):
    """What the broker is told about one delivery."""

    ACK = "ack"
    REQUEUE = "requeue"
    DEAD_LETTER = "dead_letter"


_POLICY: dict[Outcome, AckAction] = {
    Outcome.REPLIED: AckAction.ACK,
    Outcome.REPLY_REFUSED: AckAction.REQUEUE,
    Outcome.REPLY_LOST: AckAction.REQUEUE,
    Outcome.NO_REPLY_TO: AckAction.DEAD_LETTER,
    Outcome.NOT_STARTED: AckAction.REQUEUE,
}


def ack_action(outcome: Outcome) -> AckAction:
    """The broker action for an outcome. Requeued deliveries count towards the quorum queue's
    delivery limit, so a request that can never be answered ends in the dead-letter queue."""
    return _POLICY[outcome]


class AckLedger:
    """Outstanding delivery tags of one channel, in delivery order.

    ``settle(tags)`` marks deliveries ready to ack and returns the highest tag that can be acked
    with ``multiple=True``: the end of the run of settled tags at the front. Tags still being
    worked on hold back every later tag, so a multiple-ack never covers unfinished work.
    """

    def __init__(self) -> None:
        self._open: OrderedDict[int, bool] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, tag: int) -> None:
        """Record a new delivery (tags arrive in increasing order on one channel)."""
        self._open[tag] = False

    def discard(self, tag: int) -> None:
        """Forget a delivery that was settled on its own (requeued or dead-lettered)."""
        self._open.pop(tag, None)

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
            last = tag
        return last
