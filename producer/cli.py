"""``producer``: send requests to the workers from the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import uuid

import aio_pika
import aiormq.exceptions
import structlog

from producer.amqp import tls, tracing
from producer.amqp.messages import request_message
from producer.amqp.publish import publish_request, resolve_target
from producer.amqp.urls import broker_url, connect_failure
from producer.bulk.cli import add_bulk_parser, run_bulk
from producer.loadtest.cli import add_loadtest_parser, run_loadtest
from producer.route_cli import add_route_parser, run_route
from producer.wire.errors import BrokerTlsError, PublishRefusedError
from producer.wire.names import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPES,
    DEFAULT_AMQP_URL,
    DEFAULT_QUEUE,
    DIRECT_REPLY_TO,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="producer", description="Publish inference requests to qinfer workers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    send = commands.add_parser(
        "send",
        help="send one request and print its reply",
        description="Send one Open Inference Protocol request (JSON) and print the reply. Example: "
        'producer send --queue inference --json \'{"inputs": [{"name": "text", "datatype": "BYTES", '
        '"shape": [1], "data": ["hello"]}]}\'',
    )
    send.add_argument("--amqp-url", default=None, help=f"broker URL (env AMQP_URL; default {DEFAULT_AMQP_URL})")
    tls.add_arguments(send)
    send.add_argument("--queue", default=DEFAULT_QUEUE, help="request queue (default %(default)s)")
    send.add_argument("--json", dest="body", default=None, help="request body; read from stdin when omitted")
    send.add_argument(
        "--content-type", default=CONTENT_TYPE_JSON, choices=CONTENT_TYPES, help="body encoding (default %(default)s)"
    )
    send.add_argument("--timeout-s", type=float, default=30.0, help="seconds to wait for the reply (default 30)")
    add_loadtest_parser(commands)
    add_bulk_parser(commands)
    add_route_parser(commands)
    return parser


async def _send(
    url: str, options: tls.TlsOptions, queue: str, body: bytes, content_type: str, timeout_s: float
) -> bytes:
    connection = await tls.connect(url, options, timeout=timeout_s)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        reply_queue = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await reply_queue.consume(replies.put, no_ack=True)
        message = request_message(
            body, request_id=str(uuid.uuid4()), content_type=content_type, reply_to=DIRECT_REPLY_TO, timeout_s=timeout_s
        )
        traces = tracing.RoundTrips()
        traces.start(message, queue)
        try:
            await publish_request(channel, message, resolve_target(queue=queue))
            reply = await asyncio.wait_for(replies.get(), timeout_s)
        except BaseException as e:
            traces.end(message.correlation_id or "", e)
            raise
        traces.reply_arrived(reply.correlation_id, reply.headers)
        traces.end(message.correlation_id or "")
        return reply.body


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    """A logger writing to whatever ``sys.stderr`` is when it logs (not when logging was configured)."""
    return structlog.PrintLogger(sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not structlog.is_configured():
        # Replies and reports go to stdout; the few log events (warnings) go to stderr.
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING), logger_factory=_stderr_logger
        )
    try:
        provider = tracing.configure_from_env("qinfer-producer")
    except tracing.ConfigError as e:
        print(f"producer: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    finally:
        tracing.shutdown(provider)


def _run(args: argparse.Namespace) -> int:
    if args.command == "load-test":
        return run_loadtest(args)
    if args.command == "bulk":
        return run_bulk(args)
    if args.command == "route":
        return run_route(args)
    if args.command == "send":
        try:
            url = broker_url(url=args.amqp_url, url_file=args.amqp_url_file)
            options = tls.options_from_args(args)
        except (ValueError, BrokerTlsError) as e:
            print(f"producer: {e}", file=sys.stderr)
            return 2
        body = (args.body if args.body is not None else sys.stdin.read()).encode()
        try:
            reply = asyncio.run(_send(url, options, args.queue, body, args.content_type, args.timeout_s))
        except BrokerTlsError as e:
            print(f"producer: {e}", file=sys.stderr)
            return 1
        except (ConnectionError, OSError, aiormq.exceptions.AMQPConnectionError) as e:
            print(f"producer: {connect_failure(url, e)}", file=sys.stderr)
            return 1
        except TimeoutError:
            print(
                f"producer: no reply within {args.timeout_s:g} s; is a worker consuming {args.queue!r}?",
                file=sys.stderr,
            )
            return 1
        except PublishRefusedError as e:
            broker_says = e.__cause__ or e
            print(
                f"producer: the broker refused the request ({broker_says}); does queue {args.queue!r} exist?",
                file=sys.stderr,
            )
            return 1
        sys.stdout.write(reply.decode(errors="replace") + "\n")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
