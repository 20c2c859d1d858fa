"""Settling deliveries: every ack, requeue and dead-letter frame the worker sends goes through here.

Owns the ack ledger of the current consume channel and the lock that keeps decisions and frames in
order. What to tell the broker comes from :func:`worker.acks.ack_action` (the policy table); this
module only carries it out, batching acks into ``multiple=True`` frames where the ledger allows.

Called by intake (admit, settle what needs no reply), the reply step (settle after a confirm) and
the drain (hand back what never started). Calls aiormq channels only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiormq.exceptions
import structlog
from aio_pika.abc import AbstractIncomingMessage

from worker.acks import AckAction, AckLedger, Outcome, ack_action
from worker.jobs import Job
from worker.metrics import WorkerMetrics
from worker.tracing import end_job, held, log_ids

log = structlog.get_logger("worker")


def open_channel(message: AbstractIncomingMessage) -> Any | None:
    """The (aiormq) channel a message came on, or None once that channel is closed."""
    try:
        channel = message.channel
    except aiormq.exceptions.ChannelInvalidStateError:
        return None
    return None if channel.is_closed else channel


class Settler:
    """Acks, requeues and dead-letters deliveries in decision order.

    Args:
        metrics: the worker's metrics (in-flight gauge, outcome counters).
        on_hold: called for a job whose reply the broker refused: the delivery stays unacked while
            the caller retries the reply.
        on_release: called once for every job that leaves the worker (settled, or dropped with its channel).
    """

    def __init__(
        self,
        metrics: WorkerMetrics,
        *,
        on_hold: Callable[[Job], None],
        on_release: Callable[[Job], None],
    ) -> None:
        self._metrics = metrics
        self._on_hold = on_hold
        self._on_release = on_release
        self._lock = asyncio.Lock()
        self.ledger = AckLedger()
        self._ledger_channel: Any = None
        self.last_settled_s = time.monotonic()

    def admit(self, message: AbstractIncomingMessage) -> AckLedger:
        """Record a new delivery; returns the ledger of its channel."""
        if message.channel is not self._ledger_channel:
            # A new channel (first delivery, or after a reconnect): tags start again from 1.
            self._ledger_channel = message.channel
            self.ledger = AckLedger()
        assert message.delivery_tag is not None
        self.ledger.add(message.delivery_tag)
        self._metrics.inflight.inc()
        return self.ledger

    async def settle(self, settled: Sequence[tuple[Job, Outcome]]) -> None:
        """Tell the broker what happened, per :func:`ack_action`; acks are batched per channel.

        Decisions and the frames that carry them are made under one lock, in order: the write queue
        under aiormq is bounded, so two settles racing for room could otherwise send a multiple-ack
        after a later one (an unknown delivery tag, which closes the channel) or before the requeue
        of a tag it covers (acking a request meant to go back).
        """
        async with self._lock:
            self.last_settled_s = time.monotonic()
            frames: list[tuple[Any, AckAction, int, bool]] = []  # channel, action, tag, multiple
            to_ack: dict[int, tuple[AckLedger, Any, list[int]]] = {}
            for job, outcome in settled:
                message = job.message
                tag = message.delivery_tag
                assert tag is not None
                channel = open_channel(message)
                action = ack_action(outcome)
                if action is AckAction.HOLD and channel is not None:
                    job.ledger.hold(tag)
                    self._metrics.count("reply_held")
                    held(job)
                    self._on_hold(job)
                    continue
                self._metrics.inflight.dec()
                self._on_release(job)
                end_job(job, outcome.value, action.value)
                if channel is None:
                    # The broker already requeued everything unacked on that channel.
                    log.debug(
                        "settle_dropped_closed_channel",
                        request_id=job.request_id[:200],
                        outcome=outcome.value,
                        **log_ids(job),
                    )
                    continue
                job.ledger.release(tag)
                entry = to_ack.setdefault(id(job.ledger), (job.ledger, channel, []))
                if action is AckAction.ACK:
                    entry[2].append(tag)
                    continue
                job.ledger.discard(tag)
                self._metrics.count("requeued" if action is AckAction.REQUEUE else "dead_lettered")
                frames.append((channel, action, tag, False))
            for ledger, channel, tags in to_ack.values():
                # Also after a requeue or reject alone: removing a tag can free the acks queued behind it.
                last = ledger.settle(tags)
                if last is not None:
                    frames.append((channel, AckAction.ACK, last, True))
                # Settled behind a held reply: a multiple-ack would cover the held one.
                frames += [(channel, AckAction.ACK, tag, False) for tag in ledger.take_singles()]
            for channel, action, tag, multiple in frames:
                try:
                    if action is AckAction.ACK:
                        await channel.basic_ack(tag, multiple=multiple, wait=False)
                    elif action is AckAction.REQUEUE:
                        await channel.basic_nack(tag, multiple=False, requeue=True, wait=False)
                    else:
                        await channel.basic_reject(tag, requeue=False, wait=False)
                except (aiormq.exceptions.ChannelInvalidStateError, aiormq.exceptions.AMQPError, ConnectionError) as e:
                    log.debug("settle_failed", action=action.value, tag=tag, error=repr(e))
