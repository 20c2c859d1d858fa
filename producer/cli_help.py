"""``--help`` examples of each ``producer`` subcommand, their formatter, and the version ``--version`` prints.

One place for them, so they read alike and a test can parse each command line. ``producer.cli`` puts
them on the subcommands' parsers (``producer.bulk.cli`` and ``producer.loadtest.cli`` keep to their layer).

Called by ``producer.cli`` and ``producer.route_cli``.
"""

from __future__ import annotations

import argparse
import importlib.metadata

__all__ = ["EXAMPLES", "DefaultsAndExamples", "ExamplesFormatter", "examples_epilog", "package_version"]

_TEXT_REQUEST = '{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]}'

EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "send": [
        ("embed one text with the default model", f"producer send --queue inference --json '{_TEXT_REQUEST}'"),
        ("a request from a file, to version 2 of a model", "producer send --queue model.minilm.v2 < request.json"),
        ("branch on the outcome in a script", 'producer send --json "$BODY" > reply.json || echo "exit $?"'),
    ],
    "metadata": [
        ("what the model behind a queue takes and returns", "producer metadata --queue inference"),
        ("one version of a model served in versions", "producer metadata --model minilm --version 2"),
    ],
    "bulk": [
        ("embed a file of texts, resumable", "producer bulk texts.jsonl --output embeddings.jsonl"),
        ("pin a job to one version of a model", "producer bulk rows.jsonl -o out.jsonl --model minilm --version 2"),
    ],
    "load-test": [
        ("the default burst profile against the default queue", "producer load-test"),
        ("a constant 200 requests/s for 30 s", "producer load-test --mode constant --rate-per-s 200 --duration-s 30"),
    ],
    "plan": [
        (
            "two values files side by side on the default burst, plotted",
            "producer plan --calibration calibration.json --values mine.yaml --compare other.yaml --plot plan.png",
        ),
        (
            "the cheapest values with p99 under 2 s for a recorded load test",
            "producer plan --calibration calibration.json --report report.json --search --p99 2",
        ),
    ],
    "route": [
        ("a model's versions, weights and queue depths", "producer route show minilm"),
        ("move what a removed version's queue holds onto the route", "producer route drain minilm 1"),
    ],
}
"""Per subcommand: (what it does, the command line)."""


def examples_epilog(examples: list[tuple[str, str]], *, before: str = "") -> str:
    """An argparse epilog: ``before`` (already wrapped text), then each example as a comment and its command.

    Use with ``formatter_class=ExamplesFormatter`` so the examples stay as written.
    """
    lines = ["examples:"]
    for what, command in examples:
        lines += [f"  # {what}", f"  {command}"]
    text = "\n".join(lines) + "\n"
    return f"{before.rstrip()}\n\n{text}" if before else text


class ExamplesFormatter(argparse.HelpFormatter):
    """Wraps the description and the epilog's prose as usual, but prints the ``examples:`` block as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        prose, marker, examples = text.partition("examples:\n")
        filled = super()._fill_text(prose, width, indent) if prose.strip() else ""
        if not marker:
            return filled
        return (filled + "\n\n" if filled else "") + marker + examples


class DefaultsAndExamples(argparse.ArgumentDefaultsHelpFormatter, ExamplesFormatter):
    """:class:`ExamplesFormatter` that also shows each flag's default (like ``ArgumentDefaultsHelpFormatter``)."""


def package_version(distribution: str = "qinfer") -> str:
    """The installed version of ``distribution`` (from its package metadata), or ``unknown`` when not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
