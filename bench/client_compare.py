"""The RPC client against another checkout's: calls/s and the client's CPU per call, in one run.

Starts one worker (this checkout's) on a near-zero model (y = 2x + 1, FP32 [1, 4]) so the broker and the
client's host path are what is measured, then drives it in turns, round after round, with this checkout's
:class:`producer.Client` and with the one in ``--compare-tree`` (each in a child process that imports that
checkout first). Each turn: ``--callers`` concurrent callers until ``--calls`` calls are answered, once with
``coalesce_rows=1`` (every call its own request: the lane-of-its-own path) and once packed (``coalesce_rows``
64), then one caller alone. The child reads its own CPU time (user + system) around each run: CPU per call is
what the client costs the host, whatever else shares the cores. Prints medians over the rounds and the ratios
this checkout / the other (1.00: unchanged).

Usage: python -m bench.client_compare --compare-tree /tmp/before [--callers 256] [--calls 3000]
       [--single-calls 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from bench.driver import AMQP_URL, delete_queues
from producer.wire.names import dead_letter_queue
from tests.support.models import affine_model
from tests.support.worker_process import WorkerProcess

ROOT = Path(__file__).resolve().parents[1]

# Run in a child process with the checkout to measure first on sys.path: prints one JSON object.
_CHILD = """
import asyncio, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
from producer.client.rpc import Client
url, queue, callers, calls, single = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
x = np.ones((1, 4), np.float32)

def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

async def loop(client, callers, calls):
    left = iter(range(calls))
    latencies = []
    async def caller():
        for _ in left:
            t = time.perf_counter()
            await client.infer({"x": x})
            latencies.append(time.perf_counter() - t)
    cpu, t = cpu_s(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return calls / (time.perf_counter() - t), (cpu_s() - cpu) / calls * 1000, sorted(latencies)

async def main():
    out = {"module": Client.__module__, "file": sys.modules["producer"].__file__}
    for kind, rows in (("alone", 1), ("packed", 64)):
        async with Client(url, queue=queue, timeout_s=60, coalesce_rows=rows) as client:
            await loop(client, callers, min(500, calls))  # warm-up
            rate, cpu_ms, _ = await loop(client, callers, calls)
            _, _, lat = await loop(client, 1, single)
            out[kind] = {"calls_s": rate, "cpu_ms": cpu_ms, "single_p50_ms": lat[len(lat) // 2] * 1000}
    print(json.dumps(out))

asyncio.run(main())
"""


def run_client(tree: Path, queue: str, args: argparse.Namespace) -> dict[str, object]:
    """One turn of the client from ``tree`` (see :data:`_CHILD`)."""
    command = [sys.executable, "-c", _CHILD, str(tree), AMQP_URL, queue]
    command += [str(args.callers), str(args.calls), str(args.single_calls)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the client from {tree} failed: {done.stderr[-2000:]}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    if not str(result["file"]).startswith(str(tree.resolve())):
        raise RuntimeError(f"the child imported {result['file']}, not the checkout {tree}")
    return result


async def main(args: argparse.Namespace, other: Path) -> None:
    trees = {"this": ROOT, "other": other}
    queue = f"bench.client_compare.{uuid.uuid4().hex[:6]}"
    figures: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = affine_model(Path(tmp) / "affine.onnx")
        try:
            async with WorkerProcess(AMQP_URL, model, queue, "--prefetch", str(max(256, args.callers))):
                for round_no in range(1, args.rounds + 1):
                    for name, tree in trees.items():
                        result = await asyncio.to_thread(run_client, tree, queue, args)
                        for kind in ("alone", "packed"):
                            part = result[kind]
                            assert isinstance(part, dict)
                            for metric, value in part.items():
                                figures.setdefault((name, kind, metric), []).append(float(value))
                    print(f"round {round_no}/{args.rounds} done", flush=True)
        finally:
            await delete_queues(queue, dead_letter_queue(queue))

    med = statistics.median
    print()
    print(
        f"{args.callers} callers, one FP32 [1, 4] row per call, {args.calls} calls per run; one caller alone for "
        f"{args.single_calls} calls; median of {args.rounds} rounds; this = {ROOT}, other = {trees['other']}"
    )
    print(f"{'client':<22} {'calls/s':>9} {'CPU ms/call':>12} {'1-in-flight p50 ms':>19}")
    for kind in ("alone", "packed"):
        for name in trees:
            rate, cpu, p50 = (med(figures[(name, kind, m)]) for m in ("calls_s", "cpu_ms", "single_p50_ms"))
            print(f"{name + ' ' + kind:<22} {rate:>9.0f} {cpu:>12.3f} {p50:>19.3f}")
    print()
    for kind in ("alone", "packed"):
        ratios = [
            f"{label} {med(figures[('this', kind, m)]) / med(figures[('other', kind, m)]):.2f}"
            for label, m in (("calls/s", "calls_s"), ("CPU/call", "cpu_ms"), ("p50 alone", "single_p50_ms"))
        ]
        print(f"this / other, coalesce_rows={'1' if kind == 'alone' else '64'}: " + ", ".join(ratios))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare-tree", required=True, help="another checkout (e.g. `git worktree add /tmp/b REV`)")
    parser.add_argument("--callers", type=int, default=256, help="concurrent callers")
    parser.add_argument("--calls", type=int, default=3000, help="calls per run")
    parser.add_argument("--single-calls", type=int, default=300, help="calls made by one caller alone")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over both clients")
    parsed = parser.parse_args()
    asyncio.run(main(parsed, Path(parsed.compare_tree).resolve()))
