"""A bulk job's footing on the broker: its named connections, its lock, its results queue.

Owns how a run connects (connections named for the management UI: job, role, pid, host), the job lock (an
exclusive queue per job id, :func:`producer.wire.names.job_lock_queue`, that the broker frees when its owner's
connection dies) and the declaration of the durable results queue (reused as it is when declared earlier with
other arguments). Called by the bulk job (:mod:`producer.bulk.job`) at the start of a run; calls aio-pika and
:mod:`producer.amqp.tls`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions

from producer.amqp.logs import get_logger
from producer.amqp.tls import TlsOptions
from producer.amqp.tls import connect as tls_connect
from producer.bulk.options import JobFailedError, JobLockedError
from producer.wire.errors import BrokerTlsError
from producer.wire.names import job_lock_queue, results_queue, results_queue_arguments

__all__ = ["connect", "declare_results_queue", "lock_job"]

log = get_logger("bulk")

_LOCK_GRACE_S = 1.0
"""How long a run retries the job lock: a run killed a moment ago holds it until the broker sees its socket close."""
_LOCK_RETRY_S = 0.1


async def connect(amqp_url: str, tls: TlsOptions | None, job_id: str, role: str) -> aio_pika.abc.AbstractConnection:
    """A connection named for the management UI: which job, which process, what for (``publish``, ``collect``).

    Raises:
        JobFailedError: the broker cannot be reached, or TLS cannot work.
    """
    name = f"producer bulk {job_id} {role} (pid {os.getpid()} on {socket.gethostname()})"
    try:
        return await tls_connect(amqp_url, tls, client_properties={"connection_name": name})
    except BrokerTlsError as e:
        raise JobFailedError(str(e)) from e
    except (*aio_pika.exceptions.CONNECTION_EXCEPTIONS, TimeoutError) as e:
        raise JobFailedError(f"cannot connect to the broker: {e}") from e


async def lock_job(connection: aio_pika.abc.AbstractConnection, job_id: str) -> None:
    """Declare the job's lock queue, exclusive to ``connection``: one run per job id at a time.

    The broker refuses the declaration (RESOURCE_LOCKED) while another connection owns the
    queue, and deletes the queue when its owner's connection closes or dies.

    Raises:
        JobLockedError: another run still holds the lock after a short grace.
    """
    name = job_lock_queue(job_id)
    give_up_s = time.monotonic() + _LOCK_GRACE_S
    while True:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, exclusive=True, auto_delete=True)
        except aiormq.exceptions.ChannelLockedResource as e:
            if time.monotonic() >= give_up_s:
                raise JobLockedError(
                    f"job {job_id} is already running: another producer bulk holds its lock on the broker "
                    f"(queue {name}; its connections are named 'producer bulk {job_id} ...'). Only one run of "
                    "a job may collect its results. Wait for that run to finish, or stop it, then run this "
                    "command again to resume (the broker frees the lock as soon as it sees the other run's "
                    "connection gone: at once for a killed process, within the heartbeat timeout for a lost host)."
                ) from e
            await asyncio.sleep(_LOCK_RETRY_S)
            continue
        await channel.close()
        return


async def declare_results_queue(
    connection: aio_pika.abc.AbstractConnection, job_id: str, ttl_s: float
) -> tuple[aio_pika.abc.AbstractChannel, aio_pika.abc.AbstractQueue]:
    """Declare the results queue with this version's arguments, or use an existing one as it is.

    A queue declared earlier with other arguments (an older version without ``x-expires``,
    or another ``--results-ttl-s``) makes the broker refuse the declaration
    (PRECONDITION_FAILED, which closes the channel): the job then uses the queue as it is.
    """
    queue = results_queue(job_id)
    channel = await connection.channel()
    arguments = results_queue_arguments(ttl_s)
    try:
        return channel, await channel.declare_queue(queue, durable=True, arguments=arguments)
    except aio_pika.exceptions.ChannelPreconditionFailed as e:
        log.warning(
            "bulk_results_queue_differs",
            job_id=job_id,
            queue=queue,
            broker_says=str(e.args[0] if e.args else e),
            action="using the queue with the arguments it has",
            why="declared by an older version (no x-expires) or with another --results-ttl-s",
            fix=f"once no run of job {job_id} is pending, delete the queue (rabbitmqctl delete_queue "
            f"{queue}); the next run declares it with x-expires",
        )
    channel = await connection.channel()
    return channel, await channel.declare_queue(queue, passive=True)
