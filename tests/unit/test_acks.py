"""Ack policy table and the multiple-ack ledger."""

from __future__ import annotations

from worker.acks import AckAction, AckLedger, Outcome, ack_action


def test_every_outcome_has_an_explicit_action() -> None:
    assert {o: ack_action(o) for o in Outcome} == {
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


def test_ledger_acks_the_settled_prefix_with_one_multiple_ack() -> None:
    ledger = AckLedger()
    for tag in range(1, 6):
        ledger.add(tag)
    assert ledger.settle([2, 3]) is None  # 1 is still open: nothing may be covered
    assert ledger.settle([1]) == 3
    assert ledger.settle([5]) is None
    assert ledger.settle([4]) == 5
    assert len(ledger) == 0


def test_ledger_discard_frees_the_acks_behind_it() -> None:
    ledger = AckLedger()
    for tag in (1, 2, 3):
        ledger.add(tag)
    assert ledger.settle([2, 3]) is None
    ledger.discard(1)  # requeued on its own
    assert ledger.settle([]) == 3
