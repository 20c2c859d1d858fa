"""Model routes on the broker: declare a model's route, set a version's weight, show a route, drain a version.

A model's route is a consistent-hash exchange (:func:`producer.wire.names.model_exchange`). Each version's
queue (:func:`producer.wire.names.version_queue`) is bound to it with the version's weight as the binding
key; the exchange hashes each request's correlation_id (the request id) onto buckets, ``weight``
buckets per version, so a version's share of unpinned requests is its weight over the sum of the
weights, and a request id always lands on the same version while the weights stay the same.

Why this mechanism: the split happens inside the broker (producers only name the model, so
operators change weights without touching producers), it is deterministic per request id, and it
ships with every RabbitMQ distribution. Plain AMQP cannot list bindings, so setting a weight does not
read the old one: it removes every possible binding of the version (keys 1 to
:data:`~producer.wire.names.MAX_TRAFFIC_WEIGHT`; removing a binding that does not exist is a no-op) and
then binds the new weight. The exchange keeps one set of buckets per destination queue, so two
bindings of one queue never add up: one binding per version is the rule this keeps. Listing a route
(:func:`show_route`) needs the management API, which can list bindings.

Weight changes, worker starts and :func:`set_weight` all go through this module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions

from producer.amqp.logs import get_logger
from producer.amqp.publish import Refusal, Target, publish_request
from producer.amqp.tls import TlsOptions
from producer.amqp.tls import connect as tls_connect
from producer.wire.errors import InferenceError, PublishRefusedError
from producer.wire.names import (
    CONSISTENT_HASH_PLUGIN,
    MAX_TRAFFIC_WEIGHT,
    MODEL_ROUTE_ARGUMENTS,
    MODEL_ROUTE_EXCHANGE_TYPE,
    model_exchange,
    version_of_queue,
    version_queue,
)

__all__ = [
    "RouteError",
    "VersionState",
    "declare_route",
    "drain_version",
    "management_url_for",
    "set_weight",
    "shares",
    "show_route",
]

log = get_logger("routes")

DEFAULT_MANAGEMENT_PORT = 15672


class RouteError(InferenceError):
    """Raised when a model's route cannot be declared, changed, listed or drained; the message says what to do."""


def _check_weight(weight: int) -> None:
    if not 0 <= weight <= MAX_TRAFFIC_WEIGHT:
        raise ValueError(f"a traffic weight must be between 0 and {MAX_TRAFFIC_WEIGHT}, got {weight}")


async def declare_route(
    channel: aio_pika.abc.AbstractChannel, model: str, *, exchange_type: str = MODEL_ROUTE_EXCHANGE_TYPE
) -> aio_pika.abc.AbstractExchange:
    """Declare ``model``'s route exchange (durable, idempotent) and return it.

    Args:
        channel: a channel of a connection used for nothing else: a broker without the exchange type
            closes the whole connection.
        model: the model name.
        exchange_type: the exchange type (the consistent-hash exchange; tests pass another).

    Raises:
        RouteError: the broker lacks the exchange type (the plugin is not enabled), or an exchange
            with the route's name exists with another type or other arguments.
    """
    name = model_exchange(model)
    try:
        return await channel.declare_exchange(name, exchange_type, durable=True, arguments=dict(MODEL_ROUTE_ARGUMENTS))
    except aiormq.exceptions.ConnectionCommandInvalid as e:
        raise RouteError(
            f"the broker has no {exchange_type!r} exchange type, which model routes need (route {name!r}): "
            f"enable the plugin on every broker node with `rabbitmq-plugins enable {CONSISTENT_HASH_PLUGIN}` "
            f"(it ships with RabbitMQ), or serve the model unversioned (--queue, no --traffic-weight). Broker: {e}"
        ) from e
    except aiormq.exceptions.ChannelPreconditionFailed as e:
        raise RouteError(
            f"exchange {name!r} exists with another type or other arguments than a model route "
            f"({exchange_type}, {MODEL_ROUTE_ARGUMENTS}): delete it or choose another --model-name. Broker: {e}"
        ) from e


async def set_weight(channel: aio_pika.abc.AbstractChannel, model: str, version: str, weight: int) -> None:
    """Give ``version`` of ``model`` the share ``weight`` of the route's unpinned requests (0: none).

    The route exchange and the version's queue must exist (:func:`declare_route`, the worker's queue
    declaration). For the few milliseconds between removing the old binding and adding the new one,
    the version's share goes to the other versions.

    Raises:
        ValueError: ``weight`` is outside 0 to MAX_TRAFFIC_WEIGHT.
        RouteError: the route or the version's queue does not exist.
    """
    _check_weight(weight)
    exchange, queue = model_exchange(model), version_queue(model, version)
    try:
        target = await channel.get_queue(queue, ensure=True)
        # RabbitMQ answers each unbind; 100 round trips take tens of ms on a local broker.
        for key in range(1, MAX_TRAFFIC_WEIGHT + 1):
            await target.unbind(exchange, routing_key=str(key))
        if weight:
            await target.bind(exchange, routing_key=str(weight))
    except aiormq.exceptions.ChannelNotFoundEntity as e:
        raise RouteError(
            f"model {model!r} has no route or no version {version!r} (queue {queue!r}): a worker started with "
            f"--model-name {model} --model-version {version} --traffic-weight W declares both. Broker: {e}"
        ) from e
    log.info("route_weight_set", model=model, version=version, weight=weight)


@dataclasses.dataclass(frozen=True, slots=True)
class VersionState:
    """One version of a model's route, as the management API reports it.

    Attributes:
        version: the version name.
        weight: its binding key on the route (0: not bound, pinned requests only).
        ready: requests waiting in its queue (not counting those its workers hold unacknowledged).
        consumers: workers consuming its queue.
    """

    version: str
    weight: int
    ready: int
    consumers: int


def shares(states: list[VersionState]) -> dict[str, float]:
    """Each version's share of unpinned requests, 0 to 1 (all 0 when no version is bound)."""
    total = sum(s.weight for s in states)
    return {s.version: (s.weight / total if total else 0.0) for s in states}


def management_url_for(amqp_url: str, port: int = DEFAULT_MANAGEMENT_PORT) -> str:
    """The management API URL on the broker of ``amqp_url``: same host and credentials, port ``port``."""
    parts = urllib.parse.urlsplit(amqp_url)
    userinfo = f"{parts.username or 'guest'}:{parts.password or 'guest'}@"
    scheme = "https" if parts.scheme == "amqps" else "http"
    return f"{scheme}://{userinfo}{parts.hostname or '127.0.0.1'}:{port}/"


def _vhost(amqp_url: str) -> str:
    path = urllib.parse.urlsplit(amqp_url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def _get_json(management_url: str, path: str, timeout_s: float) -> Any:
    parts = urllib.parse.urlsplit(management_url)
    base = f"{parts.scheme}://{parts.hostname}:{parts.port or DEFAULT_MANAGEMENT_PORT}"
    request = urllib.request.Request(base + path)
    password_manager = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    password_manager.add_password(
        None, base, urllib.parse.unquote(parts.username or "guest"), urllib.parse.unquote(parts.password or "guest")
    )
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPBasicAuthHandler(password_manager)
    )
    where = f"the management API at {base}"
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise RouteError(f"{where} refused the credentials; pass --management-url with a user that may read") from e
        if e.code == 404:
            return None
        raise RouteError(f"{where} answered {e.code} for {path}") from e
    except (urllib.error.URLError, OSError) as e:
        raise RouteError(
            f"nothing answers at {where} ({e}): listing a route needs the management plugin "
            "(`rabbitmq-plugins enable rabbitmq_management`); pass --management-url when it is elsewhere"
        ) from e


async def show_route(
    amqp_url: str,
    model: str,
    *,
    management_url: str | None = None,
    timeout_s: float = 10.0,
    tls_options: TlsOptions | None = None,
) -> list[VersionState]:
    """The versions of ``model``'s route, sorted by version name.

    Weights and the version queues' names come from the management API (plain AMQP cannot list
    bindings); depths and consumers from passive declares over AMQP, which are exact at that moment
    (the management API's figures lag by its statistics interval). Versions at weight 0 are found by
    their queues' names.

    Args:
        amqp_url: broker URL; its path is the vhost.
        model: the model name.
        management_url: the management API (default: :func:`management_url_for` ``amqp_url``).
        timeout_s: seconds each management API call may take.

    Raises:
        RouteError: the management API cannot be reached or read, or the model has no route.
    """
    management_url = management_url or management_url_for(amqp_url)
    vhost = _vhost(amqp_url)
    exchange = model_exchange(model)
    quoted_vhost = urllib.parse.quote(vhost, safe="")
    exchange_path = f"/api/exchanges/{quoted_vhost}/{urllib.parse.quote(exchange, safe='')}"
    found = await asyncio.to_thread(_get_json, management_url, exchange_path, timeout_s)
    bindings = await asyncio.to_thread(_get_json, management_url, exchange_path + "/bindings/source", timeout_s)
    if found is None or bindings is None:
        raise RouteError(f"model {model!r} has no route (no exchange {exchange!r} in vhost {vhost!r})")
    weights: dict[str, int] = {}
    for binding in bindings:
        version = version_of_queue(model, str(binding.get("destination", "")))
        if version is not None and str(binding.get("routing_key", "")).isdigit():
            weights[version] = weights.get(version, 0) + int(binding["routing_key"])
    pattern = urllib.parse.quote(f"^{exchange}\\.v", safe="")
    queues = await asyncio.to_thread(
        _get_json, management_url, f"/api/queues/{quoted_vhost}?name={pattern}&use_regex=true&columns=name", timeout_s
    )
    versions = {v for q in queues or [] if (v := version_of_queue(model, str(q.get("name", "")))) is not None}
    states: list[VersionState] = []
    connection = await tls_connect(amqp_url, tls_options)
    async with connection:
        for version in sorted(versions | set(weights)):
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(version_queue(model, version), passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                continue  # deleted since the listing
            result = declared.declaration_result
            states.append(
                VersionState(
                    version=version,
                    weight=weights.get(version, 0),
                    ready=result.message_count or 0,
                    consumers=result.consumer_count or 0,
                )
            )
            await channel.close()
    return states


async def drain_version(
    amqp_url: str,
    model: str,
    version: str,
    *,
    delete: bool = True,
    idle_s: float = 1.0,
    tls_options: TlsOptions | None = None,
) -> int:
    """Take ``version`` off ``model``'s route and move the requests its queue holds onto the route.

    For a version whose workers are gone (its release was uninstalled) while its queue still holds
    requests: the version's binding is removed (weight 0), then each waiting request is published
    again, unchanged (same id, reply_to, deadline), to the model's route, with publisher confirms and
    ``mandatory``, and only then acknowledged, so a request is never lost: the worst case is a
    request answered twice. Requests pinned to this version are moved too: another version answers
    them and its reply names that version. With ``delete``, the emptied queue is deleted, so later
    requests pinned to the version are refused at publish instead of stranded.

    Args:
        amqp_url: broker URL.
        model: the model name.
        version: the version to drain.
        delete: delete the version's queue (and its dead-letter queue stays) once it is empty.
        idle_s: the queue counts as empty after this many seconds without a message.

    Returns:
        How many requests were moved.

    Raises:
        RouteError: no other version takes unpinned requests (nothing could answer them), or the
            version's queue does not exist.
    """
    exchange_name, queue_name = model_exchange(model), version_queue(model, version)
    connection = await tls_connect(amqp_url, tls_options)
    moved = 0
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=64)
        await set_weight(channel, model, version, 0)
        route = Target(exchange_name, "", model=model)
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity as e:
            raise RouteError(f"model {model!r} has no version {version!r} (no queue {queue_name!r})") from e
        async with queue.iterator() as messages:
            while True:
                try:
                    message = await asyncio.wait_for(messages.__anext__(), idle_s)
                except (TimeoutError, StopAsyncIteration):
                    break
                copy = aio_pika.Message(
                    message.body,
                    headers=dict(message.headers or {}),
                    content_type=message.content_type,
                    content_encoding=message.content_encoding,
                    delivery_mode=message.delivery_mode,
                    priority=message.priority,
                    correlation_id=message.correlation_id,
                    reply_to=message.reply_to,
                    expiration=message.expiration,
                    message_id=message.message_id,
                    timestamp=message.timestamp,
                    type=message.type,
                    app_id=message.app_id,
                )
                try:
                    await publish_request(channel, copy, route)
                except PublishRefusedError as e:
                    if e.reason != Refusal.UNPINNED:
                        raise  # the channel is gone or refused it: the broker requeues what was not acked
                    await message.nack(requeue=True)
                    raise RouteError(
                        f"no other version of model {model!r} takes unpinned requests (all weights are 0): "
                        f"give one a weight, then drain version {version!r} again; {moved} requests were moved"
                    ) from e.__cause__
                await message.ack()
                moved += 1
        if delete:
            declared = await channel.declare_queue(queue_name, passive=True)
            if (declared.declaration_result.message_count or 0) == 0:
                await channel.queue_delete(queue_name, if_unused=False, if_empty=False)
    log.info("route_version_drained", model=model, version=version, moved=moved, deleted=delete)
    return moved
