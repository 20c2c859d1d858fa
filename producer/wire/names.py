"""Every name two processes must agree on: queues, headers, content types, queue arguments.

The worker imports this module; the producer never imports the worker.
"""

from __future__ import annotations

import re
from typing import Any, Literal

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_QUEUE = "inference"

DEFAULT_MAX_BATCH = 64
"""Rows per model run by default (the worker's ``--max-batch``); the client coalesces and bulk jobs pack as many."""

# Direct reply-to: the broker routes a reply straight to the RPC client's channel (at-most-once).
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"

CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_MSGPACK = "application/msgpack"
CONTENT_TYPES = (CONTENT_TYPE_MSGPACK, CONTENT_TYPE_JSON)

# Headers set by producers and read by workers.
HEADER_DEADLINE_MS = "x-deadline-ms"
"""Absolute deadline, milliseconds since the Unix epoch; past it the request is never computed."""
HEADER_PUBLISHED_MS = "x-published-ms"
"""Publish time, milliseconds since the Unix epoch; lets the worker measure time spent in the broker."""
HEADER_KIND = "x-qinfer-kind"
"""What a request asks for when it is not an inference: absent for an inference request."""
KIND_METADATA = "metadata"
"""``x-qinfer-kind`` of a model metadata request: answered with the model's metadata, no model run
(see :mod:`producer.wire.metadata`)."""

# The header RabbitMQ sets on quorum queue redeliveries: how often the message was delivered before.
HEADER_DELIVERY_COUNT = "x-delivery-count"

QueueType = Literal["quorum", "classic"]
DEFAULT_DELIVERY_LIMIT = 5


def dead_letter_queue(queue: str) -> str:
    """Name of the queue that collects what ``queue`` dead-letters (poison, expired, no reply_to)."""
    return f"{queue}.dead"


def results_queue(job_id: str) -> str:
    """Name of the durable queue that collects the replies of one bulk job."""
    return f"results.{job_id}"


RESULTS_QUEUE_PATTERN = r"results\.[A-Za-z0-9_.:-]{1,200}"
"""Bulk jobs' results queues (:func:`results_queue`)."""

SERVER_NAMED_QUEUE_PATTERN = r"amq\.gen-[A-Za-z0-9_-]{22}"
"""Queues the broker named (declared with an empty name, as RabbitMQ's RPC tutorial declares its exclusive reply
queue): ``amq.gen-`` and 16 random bytes in URL-safe base64 without padding. Only the broker can create such a
name (a client's declare of any ``amq.`` name is refused), and an exclusive one is consumed by its owner alone."""

DEFAULT_REPLY_TO_PATTERN = rf"{RESULTS_QUEUE_PATTERN}|{SERVER_NAMED_QUEUE_PATTERN}"
"""The reply_to queue names a worker answers by default (besides direct reply-to): bulk jobs' results queues and
server-named queues."""

DEFAULT_RESULTS_TTL_S = 24 * 3600
"""How long a bulk job's results queue outlives its last use (no consumer, no declare), in seconds."""


def results_queue_arguments(ttl_s: float = DEFAULT_RESULTS_TTL_S) -> dict[str, Any]:
    """The ``x-`` arguments of a bulk job's results queue; every declarer uses exactly these.

    The queue is a quorum queue (replicated: replies outlive the producer) that the broker deletes
    once it has been unused for ``ttl_s`` (``x-expires``), so a reply that arrives after its job
    finished or between two runs still finds the queue, and an abandoned job's queue goes away.

    Args:
        ttl_s: seconds the queue survives without a consumer (default 24 h); at least 1 s.
    """
    if ttl_s < 1:
        raise ValueError(f"the results queue's TTL must be at least 1 s, got {ttl_s} s")
    return {"x-queue-type": "quorum", "x-expires": round(ttl_s * 1000)}


def job_lock_queue(job_id: str) -> str:
    """Name of the exclusive queue whose owner is the one run of a bulk job allowed to collect its replies.

    Outside the results-queue name pattern on purpose: workers never publish replies to it.
    """
    return f"bulk-lock.{job_id}"


def request_queue_arguments(
    queue: str,
    *,
    queue_type: QueueType = "quorum",
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
) -> dict[str, Any]:
    """The ``x-`` arguments of a request queue; every declarer uses exactly these.

    Args:
        queue: the request queue's name; its dead-letter queue is derived from it.
        queue_type: ``quorum`` (replicated, with a delivery limit) or ``classic``.
        delivery_limit: deliveries after which a quorum queue dead-letters a message
            that keeps failing (RabbitMQ 3.10 has no default). Ignored for classic queues.
    """
    arguments: dict[str, Any] = {
        "x-queue-type": queue_type,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue(queue),
    }
    if queue_type == "quorum":
        arguments["x-delivery-limit"] = delivery_limit
    return arguments


# Model versions. A model's route is a consistent-hash exchange (plugin rabbitmq_consistent_hash_exchange)
# that splits unpinned requests across the queues of its versions, by weight, hashing the request id
# (the message's correlation_id): a retried request reaches the same version while the weights stay
# the same. Each version has its own queue, bound to the route with its weight as the binding key;
# weight 0 = not bound. A pinned request goes to a version's queue directly (default exchange).
MODEL_ROUTE_EXCHANGE_TYPE = "x-consistent-hash"
CONSISTENT_HASH_PLUGIN = "rabbitmq_consistent_hash_exchange"
MODEL_ROUTE_ARGUMENTS: dict[str, Any] = {"hash-property": "correlation_id"}
"""Arguments of a model's route exchange: the request id (correlation_id) picks the version."""
MAX_TRAFFIC_WEIGHT = 100
"""Largest weight of one version. Weights are relative shares (90 and 10, or 9 and 1, split alike)."""

_ROUTE_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")


def check_route_name(kind: str, name: str) -> str:
    """``name`` when it can be part of route names (letters, digits, ``_``, ``-``; 1-100), else ValueError.

    Args:
        kind: what the name is (``model name``, ``model version``), for the message.
        name: the name to check.
    """
    if not _ROUTE_NAME.fullmatch(name):
        raise ValueError(f"{kind} {name!r} cannot name a route: use 1-100 letters, digits, '_' or '-' (no dots)")
    return name


def model_exchange(model: str) -> str:
    """Name of the consistent-hash exchange that splits ``model``'s unpinned requests across its versions."""
    return f"model.{check_route_name('model name', model)}"


def version_queue(model: str, version: str) -> str:
    """Name of the request queue of one version of ``model``; pinned requests are published straight to it."""
    return f"{model_exchange(model)}.v{check_route_name('model version', version)}"


def version_of_queue(model: str, queue: str) -> str | None:
    """The version whose queue is ``queue``, or None when ``queue`` is not a version queue of ``model``."""
    prefix = f"{model_exchange(model)}.v"
    version = queue.removeprefix(prefix)
    if version == queue or not _ROUTE_NAME.fullmatch(version):
        return None
    return version
