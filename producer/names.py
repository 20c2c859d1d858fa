"""Every name two processes must agree on: queues, headers, content types, queue arguments.

The worker imports this module; the producer never imports the worker.
"""

from __future__ import annotations

from typing import Any, Literal

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_QUEUE = "inference"

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

# The rabbitmq header that counts redeliveries on quorum queues.
HEADER_DELIVERY_COUNT = "x-delivery-count"

QueueType = Literal["quorum", "classic"]
DEFAULT_DELIVERY_LIMIT = 5


def dead_letter_queue(queue: str) -> str:
    """Name of the queue that collects what ``queue`` dead-letters (poison, expired, no reply_to)."""
    return f"{queue}.dead"


def results_queue(job_id: str) -> str:
    """Name of the durable queue that collects the replies of one bulk job."""
    return f"results.{job_id}"


DEFAULT_REPLY_TO_PATTERN = r"results\.[A-Za-z0-9_.:-]{1,200}"
"""The reply_to queue names a worker answers by default (besides direct reply-to): bulk jobs' results queues."""

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


RESULTS_QUEUE_ARGUMENTS: dict[str, Any] = results_queue_arguments()
"""The ``x-`` arguments of a bulk job's results queue with the default TTL."""


def job_lock_queue(job_id: str) -> str:
    """Name of the exclusive queue whose owner is the one run of a bulk job allowed to collect its replies.

    Outside the results-queue name pattern on purpose: workers never publish replies to it.
    """
    return f"bulk-lock.{job_id}"


def is_direct_reply_to(reply_to: str) -> bool:
    """True when ``reply_to`` is a direct reply-to address rather than a real queue."""
    return reply_to.startswith(DIRECT_REPLY_TO)


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
