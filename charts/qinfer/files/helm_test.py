"""``helm test`` of the qinfer chart: send one request to the release's queue and judge the reply.

The test Pod (templates/tests/request-test.yaml) runs this file as ``python -c <file> OPTIONS`` in the
worker image: it runs the image's client once, ``python -m producer.cli send``, against the queue the
release's workers consume (the broker URL and TLS files come from the same Secret files the workers
read), and then judges what came back. It prints one line and exits 0 on a result reply, with outputs,
from the release's model and version; otherwise it prints one line saying what went wrong and what to
look at, and exits 1: an error reply, a reply without outputs, a reply from another model or version,
no reply in time (no worker consuming), a queue that does not exist, a broker it cannot reach.

Standard library only, and no import of the project's packages, so the chart's tests can load it and
check the command it builds against the producer's own parser (tests/chart/test_chart_helm_test.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PRODUCER_MODULE = "producer.cli"
PROCESS_MARGIN_S = 30.0
"""How long past the reply timeout the producer may take to connect and exit before it counts as hung."""


@dataclass(frozen=True)
class Expected:
    """What the release should answer: on which queue, as which model and version."""

    queue: str
    model_name: str
    model_version: str
    release: str
    timeout_s: float


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qinfer-helm-test", description="Send one request to a qinfer release's queue and check the reply."
    )
    parser.add_argument("--queue", required=True, help="the release's request queue")
    parser.add_argument("--request", required=True, help="the Open Inference Protocol request body (JSON)")
    parser.add_argument("--timeout-s", type=float, required=True, help="seconds to wait for the reply")
    parser.add_argument("--model-name", required=True, help="model name the reply must carry")
    parser.add_argument("--model-version", required=True, help="model version the reply must carry")
    parser.add_argument("--release", default="", help="the Helm release, named in the hints")
    return parser


def producer_argv(queue: str, request: str, timeout_s: float) -> list[str]:
    """The ``producer`` command line (after ``python -m producer.cli``) that sends the request once."""
    return [
        "send", "--queue", queue, "--content-type", "application/json", "--json", request,
        "--timeout-s", f"{timeout_s:g}",
    ]  # fmt: skip


def _describe_outputs(outputs: list[Any]) -> str:
    described = []
    for output in outputs:
        if isinstance(output, dict):
            described.append(f"{output.get('name')} {output.get('datatype')} {output.get('shape')}")
    return ", ".join(described)


def _last_json_line(stdout: str) -> Any:
    for line in reversed(stdout.strip().splitlines()):
        if line.strip():
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def judge(returncode: int, stdout: str, stderr: str, expected: Expected, elapsed_ms: float) -> tuple[bool, str]:
    """Whether the producer's run is a pass, and the one line that says so or says what went wrong.

    ``returncode``, ``stdout`` and ``stderr`` are the ``producer send`` run's: the reply (if any) on stdout,
    the reason for a failure on stderr.
    """
    where = f"queue {expected.queue!r}"
    pods = f"kubectl get pods -l app.kubernetes.io/instance={expected.release}" if expected.release else "the pods"
    reply = _last_json_line(stdout)
    if not isinstance(reply, dict):
        reason = (stderr.strip().splitlines() or ["no output"])[-1].removeprefix("producer: ")
        if stdout.strip():
            return False, f"FAIL: the reply on {where} is not a JSON object: {stdout.strip()[:200]}"
        if elapsed_ms >= expected.timeout_s * 1000:  # whatever the producer's reason, the reply did not come
            return False, (
                f"FAIL: no reply on {where} within {expected.timeout_s:g} s ({reason}); check that the release's "
                f"workers are ready ({pods}); with autoscaling.minReplicas 0 the first worker may need longer to "
                "start: raise tests.timeoutS"
            )
        if "NO_ROUTE" in reason:  # the broker's reply text, in every version of the client's message
            reason += f"; the release's workers declare it when they start: check {pods}"
        return False, f"FAIL: no reply on {where} (producer exit {returncode}): {reason}"
    error = reply.get("error")
    if error is not None:
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        return False, f"FAIL: error reply {code} on {where}: {message}; check tests.request against the model's inputs"
    answered = (str(reply.get("model_name")), str(reply.get("model_version")))
    wanted = (expected.model_name, expected.model_version)
    if answered != wanted:
        return False, (
            f"FAIL: model {answered[0]!r} version {answered[1]!r} answered on {where}, not {wanted[0]!r} version "
            f"{wanted[1]!r}: workers of another release or model consume this queue"
        )
    outputs = reply.get("outputs")
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, dict) and o.get("data") for o in outputs):
        return False, f"FAIL: the reply of model {wanted[0]!r} on {where} has no output data"
    return True, (
        f"PASS: model {wanted[0]!r} version {wanted[1]!r} answered on {where} in {elapsed_ms:.0f} ms: "
        f"{_describe_outputs(outputs)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    expected = Expected(args.queue, args.model_name, args.model_version, args.release, args.timeout_s)
    command = [sys.executable, "-m", PRODUCER_MODULE, *producer_argv(args.queue, args.request, args.timeout_s)]
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout_s + PROCESS_MARGIN_S, check=False
        )
    except subprocess.TimeoutExpired:
        print(f"FAIL: the producer did not finish within {args.timeout_s + PROCESS_MARGIN_S:g} s", flush=True)
        return 1
    passed, line = judge(done.returncode, done.stdout, done.stderr, expected, (time.monotonic() - started) * 1000)
    print(line, flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
