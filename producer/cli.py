"""``producer``: send requests to the workers from the command line.

``producer send`` and ``producer metadata`` print the reply on stdout, a one-line reason on stderr
when it is not a result, and exit with the status of its class (:mod:`producer.exit_codes`).

Called as the ``producer`` console script; calls the subcommands' modules and the client library.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

import aio_pika
import msgspec

from producer.amqp import tls, tracing
from producer.amqp.logs import configure_cli
from producer.amqp.messages import request_message
from producer.amqp.publish import Refusal, publish_request, resolve_target
from producer.amqp.urls import broker_url, connect_failure
from producer.bulk.cli import add_bulk_parser, run_bulk
from producer.cli_help import EXAMPLES, DefaultsAndExamples, ExamplesFormatter, examples_epilog, package_version
from producer.client.rpc import Client
from producer.exit_codes import ExitCode, exit_code_for
from producer.loadtest.cli import add_loadtest_parser, run_loadtest
from producer.plan.cli import add_plan_parser, run_plan
from producer.route_cli import add_route_parser, run_route
from producer.wire.errors import (
    BrokerTlsError,
    ConnectionLostError,
    ErrorReplyError,
    PublishRefusedError,
    RequestTimeoutError,
)
from producer.wire.names import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_MSGPACK,
    CONTENT_TYPES,
    DEFAULT_AMQP_URL,
    DEFAULT_QUEUE,
    DIRECT_REPLY_TO,
)
from producer.wire.protocol import ErrorDetail

_EXIT_STATUS = """\
exit status: 0 a result, 1 an error reply, 2 bad usage, 3 no reply in time, 4 refused or unroutable
(no such queue or route), 5 broker unreachable or TLS/credentials refused, 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="producer", description="Publish inference requests to qinfer workers.")
    parser.add_argument("--version", action="version", version=f"producer {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    send = commands.add_parser(
        "send",
        help="send one request and print its reply",
        description="Send one Open Inference Protocol request (JSON) and print the reply on stdout.",
        epilog=examples_epilog(EXAMPLES["send"], before=_EXIT_STATUS),
        formatter_class=ExamplesFormatter,
    )
    _add_broker_arguments(send)
    send.add_argument("--queue", default=DEFAULT_QUEUE, help="request queue (default %(default)s)")
    send.add_argument("--json", dest="body", default=None, help="request body; read from stdin when omitted")
    send.add_argument(
        "--content-type", default=CONTENT_TYPE_JSON, choices=CONTENT_TYPES, help="body encoding (default %(default)s)"
    )
    send.add_argument("--timeout-s", type=float, default=30.0, help="seconds to wait for the reply (default 30)")
    metadata = commands.add_parser(
        "metadata",
        help="print what a model takes and returns (OIP model metadata) and the worker's limits",
        description="Ask a worker for its model's metadata (name, versions, platform, inputs and outputs with "
        "datatype and shape, max batch and text limits) over the queue; no model run. Prints it as JSON.",
        epilog=examples_epilog(EXAMPLES["metadata"], before=_EXIT_STATUS),
        formatter_class=ExamplesFormatter,
    )
    _add_broker_arguments(metadata)
    where = metadata.add_mutually_exclusive_group()
    where.add_argument("--queue", default=None, help=f"request queue (default {DEFAULT_QUEUE})")
    where.add_argument("--model", default=None, help="a model served in versions (its route; worker --model-name)")
    metadata.add_argument("--version", default=None, help="with --model: ask this version (default: any live one)")
    metadata.add_argument("--timeout-s", type=float, default=30.0, help="seconds to wait for the reply (default 30)")
    loadtest = add_loadtest_parser(commands)
    loadtest.epilog = examples_epilog(EXAMPLES["load-test"])
    loadtest.formatter_class = DefaultsAndExamples
    plan = add_plan_parser(commands)
    plan.epilog = examples_epilog(EXAMPLES["plan"])
    plan.formatter_class = DefaultsAndExamples
    bulk = add_bulk_parser(commands)
    bulk.epilog = examples_epilog(EXAMPLES["bulk"], before=bulk.epilog or "")  # bulk's epilog is laid out by hand
    add_route_parser(commands)
    return parser


def _add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--amqp-url", default=None, help=f"broker URL (env AMQP_URL; default {DEFAULT_AMQP_URL})")
    tls.add_arguments(parser)


async def _send(
    url: str, options: tls.TlsOptions, queue: str, body: bytes, content_type: str, timeout_s: float
) -> aio_pika.abc.AbstractIncomingMessage:
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
        return reply


class _MaybeError(msgspec.Struct):
    """Just enough of a reply to tell an error reply from a result (other fields are skipped)."""

    error: ErrorDetail | None = None


def _error_of(body: bytes, content_type: str | None) -> ErrorDetail | None:
    """The ``error`` of an error reply, else None (a result, or a body that is neither: printed as it is)."""
    try:
        if content_type == CONTENT_TYPE_MSGPACK:
            return msgspec.msgpack.decode(body, type=_MaybeError).error
        return msgspec.json.decode(body, type=_MaybeError).error
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_cli()  # replies and reports go to stdout; the few log events (warnings) to stderr
    try:
        provider = tracing.configure_from_env("qinfer-producer")
    except tracing.ConfigError as e:
        print(f"producer: {e}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        return _run(args)
    finally:
        tracing.shutdown(provider)


def _run(args: argparse.Namespace) -> int:
    if args.command == "load-test":
        return run_loadtest(args)
    if args.command == "plan":
        return run_plan(args)
    if args.command == "bulk":
        return run_bulk(args)
    if args.command == "route":
        return run_route(args)
    try:
        url = broker_url(url=args.amqp_url, url_file=args.amqp_url_file)
        options = tls.options_from_args(args)
    except (ValueError, BrokerTlsError) as e:
        print(f"producer: {e}", file=sys.stderr)
        return ExitCode.USAGE
    if args.command == "metadata":
        return _run_metadata(args, url, options)
    body = (args.body if args.body is not None else sys.stdin.read()).encode()
    try:
        reply = asyncio.run(_send(url, options, args.queue, body, args.content_type, args.timeout_s))
    except (KeyboardInterrupt, Exception) as e:
        return _failed(e, url=url, queue=args.queue, timeout_s=args.timeout_s)
    sys.stdout.write(reply.body.decode(errors="replace") + "\n")
    error = _error_of(reply.body, reply.content_type)
    if error is None:
        return ExitCode.OK
    print(f"producer: error reply {error.code}: {error.message}".replace("\n", " "), file=sys.stderr)
    return ExitCode.ERROR_REPLY


def _run_metadata(args: argparse.Namespace, url: str, options: tls.TlsOptions) -> int:
    async def ask() -> bytes:
        client = Client(
            url,
            queue=args.queue or DEFAULT_QUEUE,
            model=args.model,
            version=args.version,
            timeout_s=args.timeout_s,
            connect_timeout_s=args.timeout_s,
            coalesce_rows=1,
            tls=options,
        )
        async with client:
            return msgspec.json.format(msgspec.json.encode(await client.metadata()), indent=2)

    try:
        if args.version is not None and args.model is None:
            raise ValueError("--version picks a version of a model: pass --model NAME too")
        body = asyncio.run(ask())
    except ValueError as e:  # a model or version name that cannot name a route
        print(f"producer: {e}", file=sys.stderr)
        return ExitCode.USAGE
    except (KeyboardInterrupt, Exception) as e:
        return _failed(e, url=url, queue=args.queue or DEFAULT_QUEUE, timeout_s=args.timeout_s)
    sys.stdout.write(body.decode() + "\n")
    return ExitCode.OK


def _failed(error: BaseException, *, url: str, queue: str, timeout_s: float) -> int:
    """Say in one line on stderr why a send or metadata call got no result; return its exit status."""
    try:
        code = exit_code_for(error)
    except TypeError:
        raise error from None
    if code is ExitCode.INTERRUPTED:
        reason = "interrupted"
    elif code is ExitCode.ERROR_REPLY:
        assert isinstance(error, ErrorReplyError)
        reason = f"error reply {error.code}: {error.message}"
    elif code is ExitCode.TIMEOUT:
        reason = (
            str(error)
            if isinstance(error, RequestTimeoutError)
            else f"no reply within {timeout_s:g} s; is a worker consuming {queue!r}?"
        )
    elif isinstance(error, PublishRefusedError) and error.reason == Refusal.NO_QUEUE:
        reason = f"the broker could not route the request: no queue named {queue!r} (NO_ROUTE); check --queue"
    elif isinstance(error, PublishRefusedError) and error.reason == Refusal.NACKED:
        reason = f"the broker refused the request to queue {queue!r} (nack): {error.__cause__ or error}"
    elif code is ExitCode.UNROUTABLE or isinstance(error, BrokerTlsError | ConnectionLostError):
        reason = str(error)
    else:
        reason = connect_failure(url, error)
    print(f"producer: {reason}".replace("\n", " "), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
