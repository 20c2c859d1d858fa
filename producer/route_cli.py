"""``producer route``: show a model's versions and weights, drain a version whose workers are gone."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from producer.amqp import tls
from producer.amqp.routes import drain_version, shares, show_route
from producer.amqp.urls import broker_url
from producer.cli_help import EXAMPLES, ExamplesFormatter, examples_epilog
from producer.wire.errors import InferenceError
from producer.wire.names import DEFAULT_AMQP_URL, model_exchange, version_queue

__all__ = ["add_route_parser", "run_route"]

_EPILOG = """\
A version's weight is its workers' --traffic-weight (chart value worker.trafficWeight): a worker
applies it when it starts, so a weight changes by restarting the version's workers with the new one
(helm upgrade). Producers need no change. Listing a route needs the management plugin.
"""


def add_route_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``route`` subcommand to the ``producer`` CLI's subparsers and return its parser."""
    route: argparse.ArgumentParser = subparsers.add_parser(
        "route",
        help="show a model's versions, weights, queue depths and consumers; drain a removed version",
        description="Inspect and maintain a model's route (the broker's split of its requests across versions).",
        epilog=examples_epilog(EXAMPLES["route"], before=_EPILOG),
        formatter_class=ExamplesFormatter,
    )
    actions = route.add_subparsers(dest="route_action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print each version: weight, share, ready requests, consumers")
    show.add_argument("model", metavar="NAME", help="model name (worker --model-name)")
    drain = actions.add_parser(
        "drain",
        help="take a version off the route and move the requests its queue holds onto the route, then delete it",
        description="For a version whose workers are gone while its queue still holds requests: set its weight "
        "to 0, publish each waiting request again to the model's route (the other versions answer it; the reply "
        "names the version that did), then delete the emptied queue so later pinned requests are refused.",
    )
    drain.add_argument("model", metavar="NAME", help="model name")
    drain.add_argument("version", metavar="VERSION", help="the version to drain")
    drain.add_argument("--keep-queue", action="store_true", help="leave the emptied queue in place")
    for parser in (show, drain):
        parser.add_argument("--amqp-url", default=None, help=f"broker URL (env AMQP_URL; default {DEFAULT_AMQP_URL})")
        tls.add_arguments(parser)
    show.add_argument(
        "--management-url",
        default=None,
        help="management API, credentials included (default: the broker's host, port 15672, same credentials)",
    )
    return route


async def _show(amqp_url: str, model: str, management_url: str | None, options: tls.TlsOptions) -> int:
    states = await show_route(amqp_url, model, management_url=management_url, tls_options=options)
    share = shares(states)
    print(f"model {model}: route {model_exchange(model)}")
    print(f"{'version':<12} {'weight':>6} {'share':>7} {'ready':>8} {'consumers':>9}  queue")
    for s in states:
        print(
            f"{s.version:<12} {s.weight:>6} {share[s.version]:>7.1%} {s.ready:>8} {s.consumers:>9}  "
            f"{version_queue(model, s.version)}"
        )
    if not states:
        print("no versions: start a worker with --model-name NAME --model-version V --traffic-weight W")
    elif not any(s.weight for s in states):
        print("no version has a weight: unpinned requests are refused at publish")
    stranded = [s.version for s in states if s.ready and not s.consumers]
    if stranded:
        print(
            f"waiting with no consumer: version {', '.join(stranded)}; start its workers, or move its requests "
            f"onto the route with `producer route drain {model} VERSION`"
        )
    return 0


def run_route(args: argparse.Namespace) -> int:
    """Run ``producer route`` with parsed arguments; returns the exit status."""
    try:
        url = broker_url(url=args.amqp_url, url_file=args.amqp_url_file)
        options = tls.options_from_args(args)
        if args.route_action == "show":
            return asyncio.run(_show(url, args.model, args.management_url, options))
        moved = asyncio.run(
            drain_version(url, args.model, args.version, delete=not args.keep_queue, tls_options=options)
        )
    except (InferenceError, ValueError) as e:
        print(f"producer route: {e}", file=sys.stderr)
        return 1
    kept = "kept" if args.keep_queue else "deleted"
    print(f"version {args.version} of {args.model}: off the route, {moved} requests moved onto it, queue {kept}")
    return 0
