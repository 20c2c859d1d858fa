"""Publishing a request: where it goes (:class:`Target`) and what the broker's refusal means (the typed errors).

Owns the target resolver (a queue, a model's route, or a pinned version's queue -> exchange and routing key; the
names come from :mod:`producer.wire.names`) and :func:`publish_request`: one publish with ``mandatory`` on a
channel with publisher confirms, each way the broker can refuse it mapped to
:class:`~producer.wire.errors.PublishRefusedError` (with a :class:`Refusal` reason) or
:class:`~producer.wire.errors.ConnectionLostError`. Called by the RPC client, bulk jobs, the load generator, the
route drain (:mod:`producer.amqp.routes`) and ``producer send``; calls aio-pika only.
"""

from __future__ import annotations

import dataclasses
import enum

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions

from producer.wire.errors import ConnectionLostError, PublishRefusedError
from producer.wire.names import model_exchange, version_queue

__all__ = ["Refusal", "Target", "publish_request", "resolve_target"]


class Refusal(enum.StrEnum):
    """Why the broker did not take a request (:attr:`PublishRefusedError.reason`)."""

    NO_QUEUE = "no_queue"
    """Returned: no queue of that name (nothing declared it)."""
    NO_VERSION_QUEUE = "no_version_queue"
    """Returned: the pinned version has no queue (no worker was started for it)."""
    UNPINNED = "unpinned"
    """Returned by a model's route: no version takes unpinned requests (every weight is 0)."""
    NO_ROUTE = "no_route"
    """The model's route exchange does not exist (no worker declared it)."""
    NACKED = "nacked"
    """The broker nacked the publish."""


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: ``exchange`` (``""``: the default exchange) and ``routing_key``.

    ``model`` and ``version`` say what the target stands for, so a refusal can say what is missing.
    """

    exchange: str
    routing_key: str
    model: str | None = None
    version: str | None = None

    @property
    def where(self) -> str:
        """The target as error messages name it: ``route 'x'`` or ``queue 'x'``."""
        return f"route {self.exchange!r}" if self.exchange else f"queue {self.routing_key!r}"


def resolve_target(*, queue: str, model: str | None = None, version: str | None = None) -> Target:
    """The target of a request: ``queue``; or with ``model``, the pinned ``version``'s queue, else the model's route.

    The route hashes the correlation id, not the routing key, so a route's routing key is empty.

    Raises:
        ValueError: ``version`` without ``model``.
    """
    if model is None:
        if version is not None:
            raise ValueError(f"version={version!r} pins a version of a model: pass the model too")
        return Target("", queue)
    if version is not None:
        return Target("", version_queue(model, version), model=model, version=version)
    return Target(model_exchange(model), "", model=model)


async def publish_request(
    channel: aio_pika.abc.AbstractChannel, message: aio_pika.abc.AbstractMessage, target: Target
) -> None:
    """Publish ``message`` to ``target`` with ``mandatory`` and return once the broker confirmed it.

    Args:
        channel: a channel opened with ``publisher_confirms=True, on_return_raises=True``.

    Raises:
        PublishRefusedError: the broker returned the request (unroutable), nacked it, or the route does not
            exist; ``reason`` is a :class:`Refusal`.
        ConnectionLostError: the connection or channel closed while publishing.
    """
    try:
        exchange = (
            channel.default_exchange
            if not target.exchange
            else await channel.get_exchange(target.exchange, ensure=False)  # no round trip
        )
        await exchange.publish(message, routing_key=target.routing_key, mandatory=True)
    except aio_pika.exceptions.PublishError as e:
        if target.exchange:
            reason = Refusal.UNPINNED
            why = f"no version of model {target.model!r} takes unpinned requests (every weight is 0)"
        elif target.version is not None:
            reason = Refusal.NO_VERSION_QUEUE
            why = f"model {target.model!r} has no version serving {target.where} (is a worker started for it?)"
        else:
            reason, why = Refusal.NO_QUEUE, f"no queue named {target.routing_key!r}"
        raise PublishRefusedError(f"the broker could not route the request: {why}", reason=reason) from e
    except aio_pika.exceptions.DeliveryError as e:
        raise PublishRefusedError(
            f"the broker refused the request to {target.where} (nack)", reason=Refusal.NACKED
        ) from e
    except aiormq.exceptions.ChannelNotFoundEntity as e:
        raise PublishRefusedError(
            f"model {target.model!r} has no route ({target.where} does not exist): start a worker with "
            f"--model-name {target.model} --traffic-weight W, it declares the route",
            reason=Refusal.NO_ROUTE,
        ) from e
    except (aio_pika.exceptions.AMQPConnectionError, aio_pika.exceptions.ChannelInvalidStateError) as e:
        raise ConnectionLostError(f"the broker connection closed while publishing: {e}") from e
