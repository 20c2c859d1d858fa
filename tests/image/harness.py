"""``make image-test``: build the CPU image, run it against the local broker as the chart does, then run the chart.

``python -m tests.image.harness --help`` lists the options. Not part of the default ``pytest`` run (it builds an
image and starts containers, minutes rather than seconds); ``.ci/run`` runs it where podman is installed. Steps,
each printing what it measured, the run failing (exit 1) at the first that does not hold:

1. **Build** the CPU image (``scripts/build_image.py --device cpu``) on ``--base-image``; with ``--with-cuda``
   also the CUDA image, whose smoke test is then run again in the image: ``python -m worker.gpu_check
   --libraries-only``.
2. **Container**: ``podman run`` the way the chart runs the pod: ``--read-only``, ``--user 10001``, a tmpfs
   ``/tmp``, the broker URL in a read-only mounted file (``AMQP_URL_FILE``), host network to the broker. A real
   :class:`producer.client.Client` sends texts to the baked default model; every embedding must match ONNX
   Runtime in this process (cosine >= 0.9999). Then a burst, and ``podman stop`` (SIGTERM) while it is being
   answered: the worker exits 0, and replies + requests still queued == requests sent (nothing lost).
3. **Chart**: ``helm template`` (Helm's library) with the local image, the CPU device and the local broker; the
   Deployment, its Secret and ConfigMap (not the KEDA objects) go to ``podman kube play``. The pod's /livez and
   /readyz are asked from inside its network namespace (podman 4.3 does not run HTTP probes itself), it answers
   every request sent, and stopping it mid-burst drains it with nothing lost; then ``podman kube down``.

Missing podman, base image or model: one line saying what to install or run, nonzero exit. Queues are named
``image-test.<random>`` and deleted at the end; containers and pods are removed whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import numpy as np
import onnxruntime as ort
import yaml

from producer.client import Client
from tests.chart.helpers import render
from worker.pipelines.text_steps import TextPipeline

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = REPO_ROOT / "models" / "all-MiniLM-L6-v2"
BROKER_MOUNT = "/etc/qinfer/broker"
MIN_COSINE = 0.9999
SENTENCES = [
    "Hello world.",
    "A man is eating food.",
    "The new movie is awesome, everyone should see it at least once this summer.",
    "Ünïcödé façade — naïve café in Zürich; 東京タワー; emoji 🚀✨",
    "Workers consume requests from a durable queue, batch their rows, run the model and reply.",
    "",
]
SLIRP_HOST = "10.0.2.2"
"""The host's loopback as a slirp4netns pod sees it (allow_host_loopback=true)."""
START_TIMEOUT_S = 300.0
"""Start to ready: loading and warming the model up takes about a minute on two busy cores."""


class Failed(Exception):
    """A step did not hold; the message says which and what was measured."""


def say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


# ---------------------------------------------------------------------------------------------
# podman


class Podman:
    """The podman CLI with the project's containers.conf (scripts/containers-conf.sh)."""

    def __init__(self) -> None:
        path = shutil.which("podman")
        if path is None:
            raise SystemExit(
                "image-test: podman is not installed; on Debian: "
                "apt-get install -y podman buildah crun runc fuse-overlayfs debootstrap"
            )
        self.path = path
        self.env = dict(os.environ)
        if "CONTAINERS_CONF" not in self.env:
            conf = subprocess.run(
                [str(REPO_ROOT / "scripts" / "containers-conf.sh")], capture_output=True, text=True, check=True
            )
            self.env["CONTAINERS_CONF"] = str(REPO_ROOT / conf.stdout.strip())

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.path, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise Failed(f"podman {' '.join(args[:3])}: exit {done.returncode}: {done.stderr.strip()[-2000:]}")
        return done

    def image_exists(self, image: str) -> bool:
        return self.run("image", "exists", image, check=False).returncode == 0

    def exit_code(self, container: str) -> int:
        return int(self.run("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip())

    def logs(self, container: str) -> str:
        done = self.run("logs", container, check=False)
        return done.stdout + done.stderr

    def http_status(self, container: str, port: int, path: str) -> int:
        """GET ``path`` on the container's port from inside its network namespace (the kubelet's view)."""
        script = (
            "import sys, urllib.request, urllib.error\n"
            "try:\n"
            f"    print(urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=5).status)\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code)\n"
            "except OSError:\n"
            "    print(0)\n"
        )
        done = self.run("exec", container, "python", "-c", script, check=False, timeout=30)
        return int(done.stdout.strip() or 0) if done.returncode == 0 else 0


def wait_until(what: str, condition: Any, timeout_s: float = START_TIMEOUT_S) -> float:
    """Poll ``condition()`` until true; the seconds it took. Raises Failed with ``what`` past the deadline."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise Failed(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.25)
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------------
# the broker side


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


async def queued(amqp_url: str, queue: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def delete_queues(amqp_url: str, queues: list[str]) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            await channel.queue_delete(name)


def reference_embeddings(texts: list[str]) -> np.ndarray[Any, Any]:
    """The default model's embeddings computed here with ONNX Runtime (CPU), the worker's own pipeline steps."""
    pipeline = TextPipeline.from_folder(MODEL)
    session = ort.InferenceSession(str(MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    return pipeline.embed(texts, lambda feeds: session.run([pipeline.hidden_state], dict(feeds))[0])


async def check_answers(amqp_url: str, queue: str, step: str) -> None:
    """Each sentence once, as its own request; every embedding against the in-process reference."""
    expected = reference_embeddings(SENTENCES)
    async with Client(amqp_url, queue=queue, timeout_s=60, coalesce_rows=1) as client:
        replies = await asyncio.gather(*(client.infer_text([text]) for text in SENTENCES))
    worst = 1.0
    for reply, want in zip(replies, expected, strict=True):
        got = np.asarray(reply.outputs["embedding"], dtype=np.float64)[0]
        cosine = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
        worst = min(worst, cosine)
    if worst < MIN_COSINE:
        raise Failed(f"{step}: embeddings differ from in-process ONNX Runtime: lowest cosine {worst:.6f}")
    say(step, f"{len(replies)} requests answered; embeddings vs in-process ONNX Runtime: lowest cosine {worst:.6f}")


async def burst_then_stop(amqp_url: str, queue: str, sent: int, stop: Any, step: str) -> tuple[int, int]:
    """Send ``sent`` requests, call ``stop()`` (blocking: SIGTERM and wait) once a tenth is answered.

    Returns (replied, still queued) once every request is accounted for, one way or the other.
    """
    async with Client(amqp_url, queue=queue, timeout_s=300, coalesce_rows=1) as client:
        replies: list[int] = []
        some_answered = asyncio.Event()

        async def one(i: int) -> None:
            reply = await client.infer_text([f"{SENTENCES[i % len(SENTENCES)]} #{i}"])
            if reply.outputs["embedding"].shape != (1, 384):
                raise Failed(f"{step}: reply {i} has shape {reply.outputs['embedding'].shape}")
            replies.append(i)
            if len(replies) >= sent // 10:
                some_answered.set()

        tasks = [asyncio.create_task(one(i)) for i in range(sent)]
        await asyncio.wait_for(some_answered.wait(), START_TIMEOUT_S)
        say(step, f"{len(replies)} of {sent} answered: SIGTERM")
        await asyncio.to_thread(stop)
        # The worker is gone: what it answered is on its way to us, the rest is back in the queue.
        deadline = time.monotonic() + 60
        waiting = await queued(amqp_url, queue)
        while len(replies) + waiting < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            waiting = await queued(amqp_url, queue)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return len(replies), waiting


def check_drained(step: str, sent: int, replied: int, waiting: int, exit_code: int, logs: str) -> None:
    lost = sent - replied - waiting
    drained = next((line for line in logs.splitlines() if '"worker_drained"' in line), "")
    say(step, f"exit {exit_code}; sent {sent}, replied {replied}, still queued {waiting}, lost {lost}")
    if drained:
        event = json.loads(drained)
        say(step, f"worker_drained: handed back {event.get('handed_back')}, drain {event.get('drain_s')} s")
    if exit_code != 0:
        raise Failed(f"{step}: the worker exited {exit_code} on SIGTERM; its log ends:\n{logs[-3000:]}")
    if lost != 0:
        raise Failed(f"{step}: {lost} requests neither answered nor back in the queue")
    if not drained:
        raise Failed(f"{step}: the worker's log has no worker_drained event:\n{logs[-3000:]}")


# ---------------------------------------------------------------------------------------------
# the steps


def build(podman: Podman, base_image: str, device: str, tag: str) -> None:
    command = [sys.executable, str(REPO_ROOT / "scripts" / "build_image.py"), "--tag", tag, "--device", device]
    command += ["--base-image", base_image, "--version", image_version()]
    done = subprocess.run(command, env=podman.env, capture_output=True, text=True, check=False)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode != 0:
        raise Failed(f"build {device}: {done.stderr.strip()[-3000:]}\n{last}")
    say(f"build {device}", last.removeprefix("image: "))


def image_version() -> str:
    import tomllib

    return str(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"])


def gpu_smoke(podman: Podman, tag: str) -> None:
    done = podman.run("run", "--rm", "--read-only", "--user", "10001", "--tmpfs", "/tmp", "--entrypoint", "python",
                      tag, "-m", "worker.gpu_check", "--libraries-only", check=False, timeout=600)  # fmt: skip
    for line in (done.stdout + done.stderr).strip().splitlines():
        say("gpu-check", line)
    if done.returncode != 0:
        raise Failed(f"gpu-check in {tag}: exit {done.returncode}")


def container_run(podman: Podman, amqp_url: str, tag: str, queue: str, folder: Path) -> None:
    step = "container"
    url_file = folder / "amqp-url"
    url_file.write_text(amqp_url)
    url_file.chmod(0o444)
    port = free_port()
    name = f"qinfer-image-test-{secrets.token_hex(3)}"
    podman.run(
        "run", "--detach", "--name", name, "--read-only", "--user", "10001:10001", "--tmpfs", "/tmp",
        "--network", "host", "--volume", f"{url_file}:{BROKER_MOUNT}/amqp-url:ro",
        "--env", f"AMQP_URL_FILE={BROKER_MOUNT}/amqp-url", "--env", f"WORKER_QUEUE={queue}",
        "--env", "WORKER_DEVICE=cpu", "--env", f"WORKER_HTTP_PORT={port}", "--env", "WORKER_DRAIN_TIMEOUT_S=25",
        tag,
    )  # fmt: skip
    try:
        say(step, f"{name}: --read-only --user 10001 --tmpfs /tmp --network host, AMQP_URL_FILE, queue {queue}")
        took = wait_until(f"{step}: /readyz on port {port}", lambda: local_ready(port) or not running(podman, name))
        if not local_ready(port):
            raise Failed(f"{step}: the worker stopped before it was ready; its log:\n{podman.logs(name)[-3000:]}")
        say(step, f"ready (/readyz 200) {took:.1f} s after start")
        asyncio.run(check_answers(amqp_url, queue, step))
        sent = 300
        replied, waiting = asyncio.run(
            burst_then_stop(amqp_url, queue, sent, lambda: podman.run("stop", "--time", "40", name), step)
        )
        check_drained(step, sent, replied, waiting, podman.exit_code(name), podman.logs(name))
    finally:
        podman.run("rm", "--force", name, check=False)


def running(podman: Podman, container: str) -> bool:
    done = podman.run("inspect", "--format", "{{.State.Running}}", container, check=False)
    return done.stdout.strip() == "true"


def chart_manifests(tag: str, queue: str, amqp_url: str, release: str) -> list[dict[str, Any]]:
    """The chart rendered for this machine: local image, CPU, no KEDA, no GPU; Deployment, Secret, ConfigMap."""
    repository, _, image_tag = tag.rpartition(":")
    host_url = amqp_url.replace("127.0.0.1", SLIRP_HOST).replace("localhost", SLIRP_HOST)
    values = {
        "fullnameOverride": release,
        "image": {"repository": f"localhost/{repository}", "tag": image_tag, "pullPolicy": "Never"},
        "autoscaling": {"enabled": False},
        "gpu": {"enabled": False},
        "replicaCount": 1,
        "worker": {"device": "cpu", "queue": queue, "processes": 1},
        "resources": {},
        "broker": {"auth": {"amqpUrl": host_url}},
    }
    documents = render(values).documents
    # Secret and ConfigMap before the Deployment that mounts them: kube play reads the documents in order.
    order = {"Secret": 0, "ConfigMap": 1, "Deployment": 2}
    kept = sorted((doc for doc in documents if doc["kind"] in order), key=lambda doc: order[doc["kind"]])
    for doc in kept:
        doc["metadata"].pop("namespace", None)
        if doc["kind"] == "Secret":
            # podman 4.3 kube play writes a Secret's `data` into a named volume still base64-encoded
            # (containers/podman#16625) and writes no stringData at all: seed_secret_volume() writes the
            # decoded values into that volume first, and the Secret keeps them as stringData only.
            data = doc.pop("data")
            doc["stringData"] = {key: base64.b64decode(value).decode() for key, value in data.items()}
    return kept


def seed_secret_volume(podman: Podman, secret: dict[str, Any], deployment: dict[str, Any]) -> None:
    """The named volume podman 4.3 mounts for a Secret volume, holding the Secret's keys at their item paths,
    mode 0440 for the pod's user and fsGroup, as the kubelet would write them."""
    name = secret["metadata"]["name"]
    spec = deployment["spec"]["template"]["spec"]
    user, group = spec["securityContext"]["runAsUser"], spec["securityContext"].get("fsGroup", 0)
    podman.run("volume", "create", name)
    mountpoint = Path(podman.run("volume", "inspect", "--format", "{{.Mountpoint}}", name).stdout.strip())
    for volume in spec["volumes"]:
        if volume.get("secret", {}).get("secretName") != name:
            continue
        for item in volume["secret"].get("items") or [{"key": k, "path": k} for k in secret["stringData"]]:
            target = mountpoint / item["path"]
            target.write_text(secret["stringData"][item["key"]])
            os.chown(target, user, group)
            target.chmod(volume["secret"].get("defaultMode", 0o644))


def kube_play(podman: Podman, amqp_url: str, tag: str, queue: str, folder: Path) -> None:
    step = "kube play"
    manifests = chart_manifests(tag, queue, amqp_url, f"qinfer-image-test-{secrets.token_hex(3)}")
    kinds = ", ".join(sorted(doc["kind"] for doc in manifests))
    path = folder / "qinfer.yaml"
    path.write_text(yaml.safe_dump_all(manifests, sort_keys=False))
    deployment = next(doc for doc in manifests if doc["kind"] == "Deployment")
    port = next(p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"])
    for doc in manifests:
        if doc["kind"] == "Secret":
            seed_secret_volume(podman, doc, deployment)
    podman.run("kube", "play", "--network", "slirp4netns:allow_host_loopback=true", str(path), timeout=300)
    try:
        # podman names a Deployment's pod NAME-pod-0 (its first replica) and the container POD-CONTAINER.
        listed = podman.run("ps", "--all", "--format", "{{.Names}}").stdout.split()
        prefix = f"{deployment['metadata']['name']}-pod"
        workers = [name for name in listed if name.startswith(prefix) and name.endswith("-worker")]
        if len(workers) != 1:
            raise Failed(f"{step}: expected one worker container in pod {prefix}*, podman lists {listed}")
        (container,) = workers
        pod = container.removesuffix("-worker")
        say(step, f"helm template -> {kinds}; pod {pod}, container {container}, broker {SLIRP_HOST} (slirp4netns)")
        settings = podman.run("inspect", "--format", "{{.Config.User}} ro={{.HostConfig.ReadonlyRootfs}}", container)
        say(step, f"user {settings.stdout.strip()}")

        def probes_pass() -> bool:
            if not running(podman, container):
                raise Failed(f"{step}: the worker stopped; its log:\n{podman.logs(container)[-3000:]}")
            return podman.http_status(container, port, "/readyz") == 200

        took = wait_until(f"{step}: /readyz", probes_pass)
        live, ready = podman.http_status(container, port, "/livez"), podman.http_status(container, port, "/readyz")
        say(step, f"probes: /livez {live}, /readyz {ready} ({took:.1f} s after kube play)")
        if (live, ready) != (200, 200):
            raise Failed(f"{step}: probes /livez {live}, /readyz {ready}")
        asyncio.run(check_answers(amqp_url, queue, step))
        sent = 500  # above the chart's prefetch (256), so some are still queued at SIGTERM
        # podman 4.3 `kube down` stops with no grace period: stop the worker with the Deployment's own first.
        grace = str(deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
        replied, waiting = asyncio.run(
            burst_then_stop(amqp_url, queue, sent, lambda: podman.run("stop", "--time", grace, container), step)
        )
        check_drained(step, sent, replied, waiting, podman.exit_code(container), podman.logs(container))
    finally:
        podman.run("kube", "down", str(path), check=False)
        for doc in manifests:  # podman 4.3 keeps a played Secret, and its volume
            if doc["kind"] == "Secret":
                podman.run("secret", "rm", doc["metadata"]["name"], check=False)
                podman.run("volume", "rm", "--force", doc["metadata"]["name"], check=False)
        say(step, "kube down")


@contextlib.contextmanager
def cleanup(amqp_url: str, queues: list[str]) -> Iterator[None]:
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(delete_queues(amqp_url, queues))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.image.harness",
        description="Build the worker image and run it (podman run, then the chart with podman kube play) "
        "against the local broker.",
    )
    parser.add_argument("--base-image", default="localhost/debian-python:bookworm", help="BASE_IMAGE to build on")
    parser.add_argument("--tag", default="", help="CPU image tag (default qinfer:VERSION-cpu)")
    parser.add_argument("--with-cuda", action="store_true", help="also build the CUDA image and run its gpu-check")
    parser.add_argument("--skip-build", action="store_true", help="use the CPU image already built")
    args = parser.parse_args(argv)
    amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    podman = Podman()
    if args.base_image.startswith("localhost/") and not podman.image_exists(args.base_image):
        print(f"image-test: no base image {args.base_image}; run `make base-image` first (scripts/base-image.sh)")
        return 2
    if not (MODEL / "model.onnx").is_file():
        print("image-test: models/all-MiniLM-L6-v2 is missing; run `make model`")
        return 2
    tag = args.tag or f"qinfer:{image_version()}-cpu"
    suffix = secrets.token_hex(4)
    queues = [f"image-test.{suffix}.run", f"image-test.{suffix}.kube"]
    started = time.monotonic()
    try:
        with cleanup(amqp_url, queues), tempfile.TemporaryDirectory(prefix="qinfer-image-test-") as tmp:
            folder = Path(tmp)
            folder.chmod(0o755)
            if not args.skip_build:
                build(podman, args.base_image, "cpu", tag)
            if args.with_cuda:
                cuda_tag = tag.removesuffix("-cpu") + "-cuda"
                build(podman, args.base_image, "cuda", cuda_tag)
                gpu_smoke(podman, cuda_tag)
            size = podman.run("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()
            say("image", f"{tag}: {int(size) // 1_000_000} MB")
            container_run(podman, amqp_url, tag, queues[0], folder)
            kube_play(podman, amqp_url, tag, queues[1], folder)
    except Failed as e:
        print(f"image-test: FAILED: {e}")
        return 1
    print(f"image-test: PASS in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
