"""Publishing replies, one at a time or many at once, so that no reply can cost a neighbour its own.

Owns the worker's publish connection (publisher confirms; separate from the consume connection so a
publisher blocked by a broker alarm never stalls acks) and a *probation* connection.

Replies go straight to the aiormq channel under the robust channel: building aio-pika's Message per
reply was a measurable share of the worker's CPU. Results queues are published ``mandatory``: a
return (``NO_ROUTE``: the queue does not exist) is permanent, so the request is dead-lettered at
once instead of being retried. A direct reply-to address is not a queue (RabbitMQ returns mandatory
publishes to it even when it delivered them), so those are published without ``mandatory``.

A direct reply-to address whose pid part the broker cannot resolve makes RabbitMQ close the whole
publishing connection (``INTERNAL_ERROR``). The first reply to each pid therefore goes out alone on
the probation connection; once the broker confirmed it, the pid is trusted and its replies share the
publish connection. If the probation connection dies with ``INTERNAL_ERROR`` while that one reply was
on it, the address is at fault: its request is dead-lettered and every reply to the same pid with it.

Called by the worker's reply step; calls aio-pika/aiormq only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
from collections import OrderedDict
from typing import Any

import aiormq
import aiormq.exceptions
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractRobustConnection, DeliveryMode

from producer.amqp.tls import TlsOptions
from producer.amqp.tls import connect as tls_connect
from worker.broker import connect
from worker.reply_to import ReplyTo, ReplyToKind

log = structlog.get_logger("worker")

_TRANSIENT = int(DeliveryMode.NOT_PERSISTENT)
_PERSISTENT = int(DeliveryMode.PERSISTENT)
_TRUSTED_PIDS = 65536  # most direct reply-to pids remembered as good (least recently used go first)
_BAD_PIDS = 4096  # most remembered as fatal
_CLOSE_TIMEOUT_S = 5.0


class Published(enum.Enum):
    """What became of one reply."""

    CONFIRMED = "confirmed"
    """The broker confirmed it."""
    REFUSED = "refused"
    """The broker nacked it (e.g. a full results queue): worth another try later."""
    UNROUTABLE = "unroutable"
    """The broker returned it: its results queue does not exist. Permanent."""
    FATAL_ADDRESS = "fatal_address"
    """Publishing it alone closed the connection: its direct reply-to address is forged or stale."""
    LOST = "lost"
    """Connection trouble: unknown whether it arrived."""


@dataclasses.dataclass(frozen=True, slots=True)
class Outgoing:
    """One reply to publish: its body and the properties it travels with."""

    body: bytes
    content_type: str
    correlation_id: str | None
    to: ReplyTo
    headers: dict[str, Any] | None = None  # AMQP headers (the trace context), or None


class Replier:
    """Publishes replies with confirms; see the module docstring for how failures are kept apart.

    Args:
        amqp_url: the broker URL.
        connect_timeout_s: how long to retry the broker when the publish connection is opened.
        tls: TLS options for an ``amqps://`` URL (default: the system's CAs, host name verified).
    """

    def __init__(self, amqp_url: str, *, connect_timeout_s: float, tls: TlsOptions | None = None) -> None:
        self._url = amqp_url
        self._tls = tls
        self._connect_timeout_s = connect_timeout_s
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._probation: AbstractConnection | None = None
        self._probation_channel: Any = None
        self._probation_lock = asyncio.Lock()
        self._trusted: OrderedDict[str, None] = OrderedDict()
        self._bad: OrderedDict[str, None] = OrderedDict()
        self._probing: dict[str, asyncio.Future[Published]] = {}

    async def open(self) -> None:
        """Open the publish connection (retried for up to ``connect_timeout_s``)."""
        self._connection = await connect(
            self._url, timeout_s=self._connect_timeout_s, name="qinfer-worker-publish", tls_options=self._tls
        )
        self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)

    async def close(self) -> None:
        """Close both connections; a broker that is down cannot answer, which is fine."""
        for conn in (self._probation, self._connection):
            if conn is not None and not conn.is_closed:
                try:
                    await asyncio.wait_for(conn.close(), _CLOSE_TIMEOUT_S)
                except Exception as e:
                    log.debug("close_failed", error=repr(e))

    async def publish(self, reply: Outgoing) -> Published:
        """Publish one reply and wait for the broker's verdict. Never raises for broker trouble."""
        to = reply.to
        if to.kind is ReplyToKind.DIRECT and to.pid not in self._trusted:
            verdict = await self._probe(reply)
            if verdict is not None:
                return verdict
        assert self._channel is not None
        try:
            channel = await self._channel.get_underlay_channel()
            await self._basic_publish(channel, reply)
        except aiormq.exceptions.PublishError:
            return Published.UNROUTABLE
        except aiormq.exceptions.DeliveryError:
            return Published.REFUSED
        except Exception as e:
            log.warning("reply_lost", reply_to=to.address, error=repr(e))
            return Published.LOST
        if to.kind is ReplyToKind.DIRECT:  # still trusted: least recently used pids are forgotten first
            self._remember(self._trusted, to.pid, _TRUSTED_PIDS)
        return Published.CONFIRMED

    @staticmethod
    async def _basic_publish(channel: Any, reply: Outgoing) -> None:
        direct = reply.to.kind is ReplyToKind.DIRECT
        await channel.basic_publish(
            reply.body,
            exchange="",
            routing_key=reply.to.address,
            properties=aiormq.spec.Basic.Properties(
                content_type=reply.content_type,
                correlation_id=reply.correlation_id,
                delivery_mode=_TRANSIENT if direct else _PERSISTENT,
                headers=reply.headers or None,
            ),
            mandatory=not direct,
        )

    async def _probe(self, reply: Outgoing) -> Published | None:
        """Publish the first reply to an untrusted pid alone on the probation connection.

        Returns the verdict for this reply, or None when the pid turned out good and the reply
        should go out on the publish connection like any other.
        """
        to = reply.to
        if to.pid in self._bad:
            return Published.FATAL_ADDRESS
        waiting = self._probing.get(to.pid)
        if waiting is not None:  # another reply to this pid is on probation: share its verdict
            verdict = await asyncio.shield(waiting)
            return None if verdict is Published.CONFIRMED else verdict
        future: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
        self._probing[to.pid] = future
        verdict = Published.LOST
        try:
            verdict = await self._publish_on_probation(reply)
        finally:
            del self._probing[to.pid]
            future.set_result(verdict)
        if verdict is Published.CONFIRMED:
            self._remember(self._trusted, to.pid, _TRUSTED_PIDS)
        elif verdict is Published.FATAL_ADDRESS:
            self._remember(self._bad, to.pid, _BAD_PIDS)
        return verdict

    async def _publish_on_probation(self, reply: Outgoing) -> Published:
        async with self._probation_lock:
            try:
                if self._probation is None or self._probation.is_closed:
                    self._probation = await tls_connect(
                        self._url,
                        self._tls,
                        timeout=self._connect_timeout_s or None,
                        client_properties={"connection_name": "qinfer-worker-probation"},
                    )
                    self._probation_channel = await (
                        await self._probation.channel(publisher_confirms=True)
                    ).get_underlay_channel()
                await self._basic_publish(self._probation_channel, reply)
            except aiormq.exceptions.ConnectionInternalError:
                self._probation = None
                return Published.FATAL_ADDRESS
            except aiormq.exceptions.DeliveryError:
                return Published.REFUSED
            except Exception as e:
                log.warning("reply_lost", reply_to=reply.to.address, error=repr(e))
                if self._probation is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._probation.close(), _CLOSE_TIMEOUT_S)
                self._probation = None
                return Published.LOST
        return Published.CONFIRMED

    @staticmethod
    def _remember(seen: OrderedDict[str, None], pid: str, most: int) -> None:
        seen[pid] = None
        seen.move_to_end(pid)
        while len(seen) > most:
            seen.popitem(last=False)
