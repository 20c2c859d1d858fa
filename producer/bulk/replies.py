"""A bulk job's replies: which count, what they answer, which version answered, and what is dropped.

Owns :class:`ReplyHandler`: the requests this run sent and awaits, the check that a reply answers one of the
job's requests (this run's by correlation id and echoed body id; an earlier run's by the signed ids,
:mod:`producer.bulk.signed_ids`), the version check (the first version to answer pins the job,
:class:`producer.bulk.state.JobState`; replies from another are counted), and the rejection of everything
else (counted, logged a bounded number of times, never written). The rows a reply answers go to the
ledger (:class:`producer.bulk.ledger.RowLedger`); an error reply's rows go back to the job, which splits
and resends them.

Called by the bulk job (:mod:`producer.bulk.job`) for each message of the results queue. Pure: it gets a
reply's correlation id, body and content type; nothing here talks to the broker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from producer.amqp.logs import get_logger
from producer.bulk.jsonl import Row, result_lines
from producer.bulk.ledger import RowLedger
from producer.bulk.options import BulkSummary
from producer.bulk.signed_ids import RequestSigner, UnverifiedReplyError
from producer.bulk.state import JobState
from producer.wire.errors import ProtocolError
from producer.wire.protocol import ErrorCode, ErrorReply, decode_reply

__all__ = ["ReplyHandler", "Sent"]

log = get_logger("bulk")

_LOGGED_REJECTIONS = 100
"""Rejected replies logged one by one; past this they are only counted (a flood must not flood the log)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Sent:
    """A request this run published and has no reply to yet."""

    rows: list[Row]
    body_id: str


class ReplyHandler:
    """Turns the messages of a job's results queue into written rows, resends, or rejections.

    Args:
        signer: the job's signer (checks replies to an earlier run's requests).
        ledger: where answered rows go.
        state: the job's pinned version (None until a reply names one, with a model).
        summary: counts ``forged`` and ``other_version`` replies.
        on_error: ``(rows, code, message)``: a request of this run failed; the job splits or reports its rows.
    """

    def __init__(
        self,
        signer: RequestSigner,
        ledger: RowLedger,
        state: JobState,
        summary: BulkSummary,
        *,
        on_error: Callable[[list[Row], str, str], None],
    ) -> None:
        self.job_id = signer.job_id
        self.requests: dict[str, Sent] = {}
        """This run's requests awaiting a reply, by correlation id."""
        self._signer = signer
        self._ledger = ledger
        self._state = state
        self._summary = summary
        self._on_error = on_error

    def handle(self, correlation_id: str, body: bytes, content_type: str | None) -> None:
        """Write the rows a reply answers, once its ids prove this job sent the request.

        A reply to a request this run sent is recognised by its correlation id (which carries
        the request's tag) and must echo the body id the request carried. Any other reply must
        verify under the job's secret (:meth:`RequestSigner.verify`): it answers a request of an
        earlier run, or answers one of this run's requests a second time. Everything else is
        dropped (:meth:`_reject`); the caller acks it either way.
        """
        sent = self.requests.get(correlation_id) if correlation_id else None
        try:
            reply = decode_reply(body, content_type)
        except ProtocolError as e:
            if sent is None:
                self._reject(correlation_id, f"the body cannot be decoded ({e})")
                return
            del self.requests[correlation_id]
            log.warning("bulk_bad_reply", job_id=self.job_id, request_id=correlation_id, error=str(e))
            self._on_error(sent.rows, e.code, f"the worker's reply could not be decoded: {e.message}")
            return
        rows: list[tuple[int, str]]
        if sent is not None:
            # A worker that could not decode the request answers with the correlation id as the body id.
            if reply.id != sent.body_id and not (isinstance(reply, ErrorReply) and reply.id == correlation_id):
                self._reject(correlation_id, "the body id is not the one the request carried")
                return
            del self.requests[correlation_id]
            if isinstance(reply, ErrorReply):
                self._on_error(sent.rows, reply.code, reply.message)
                return
            rows = [(r.line, r.id) for r in sent.rows]
        else:
            try:
                rows = self._signer.verify(correlation_id, reply.id)
            except UnverifiedReplyError as e:
                self._reject(correlation_id, str(e))
                return
            if isinstance(reply, ErrorReply):
                # An earlier run's request failed (or this run's was answered twice): its rows are sent again.
                return
        self._check_version(reply.model_version)
        try:
            lines = result_lines(rows, reply)
        except ValueError as e:
            if sent is not None:
                self._on_error(sent.rows, ErrorCode.INTERNAL, f"the worker's reply does not match the request: {e}")
            return
        for (_, row_id), text in zip(rows, lines, strict=True):
            self._ledger.resolve(row_id, text, None, earlier_run=sent is None)

    def _check_version(self, version: str | None) -> None:
        """Pin the job to the first version that answers; count (and warn about) replies from another one."""
        if self._state.model is None or version is None:
            return
        if self._state.version is None:
            self._state.record_version(version)
        elif version != self._state.version:
            self._summary.other_version += 1
            if self._summary.other_version == 1:
                log.warning(
                    "bulk_other_version",
                    job_id=self.job_id,
                    pinned=self._state.version,
                    answered=version,
                    why="the pinned version's queue was drained onto the route (its release was removed)",
                    action="written; the summary counts these rows",
                )

    def _reject(self, correlation_id: str, reason: str) -> None:
        """Drop a reply nothing proves this job asked for: count it, log it, never write it."""
        self._summary.forged += 1
        if self._summary.forged > _LOGGED_REJECTIONS:
            return
        log.warning(
            "bulk_reply_rejected",
            job_id=self.job_id,
            correlation_id=correlation_id[:120],
            reason=reason,
            action="acked and dropped",
            why="it answers no request of this job: forged, or sent to this queue by mistake",
        )
        if self._summary.forged == _LOGGED_REJECTIONS:
            log.warning(
                "bulk_reply_rejected_quiet",
                job_id=self.job_id,
                note="further rejected replies are counted in the summary, not logged",
            )
