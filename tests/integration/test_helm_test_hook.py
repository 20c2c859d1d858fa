"""The chart's ``helm test`` hook, run for real: the rendered Pod's command against the real broker and a real worker.

The command and environment come from the hook Pod as Helm renders it (templates/tests/request-test.yaml); only
``python`` becomes this interpreter and the Secret files the Pod mounts become local files. The hook must pass on
a result reply from the release's model and fail, exit 1 with one line saying what went wrong, on an error reply,
a reply from another model, no worker consuming, and no queue at all; and it must speak mutual TLS when the
release does. The verdict rests on the reply and the time waited, not on the producer's exit status, so the hook
judges images of older clients the same way.
"""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from producer.wire.names import dead_letter_queue
from tests.chart.helpers import INSTALL_TIME_CREDENTIALS, INSTALL_TIME_TLS_CREDENTIALS, deep_merge, hook_pod, render
from tests.support.models import text_model_folder
from tests.support.tls_broker import TlsBroker
from tests.support.worker_process import REPO_ROOT, child_env
from tests.support.workers import running_worker

pytestmark = pytest.mark.integration

MODEL_NAME = "tiny-text"
"""The model folder's name: what the chart expects the replies to carry (worker.modelName left empty)."""
HOOK_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return text_model_folder(tmp_path_factory.mktemp("models") / MODEL_NAME)


@pytest.fixture
def release_queue(cleanup_queues: list[str]) -> str:
    name = f"helmtest.{uuid.uuid4().hex[:12]}"
    cleanup_queues.extend([dead_letter_queue(name), name])
    return name


def hook(queue: str, tests: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The rendered helm test Pod of a release whose workers consume ``queue`` and serve the tiny text model."""
    values = deep_merge(
        base or INSTALL_TIME_CREDENTIALS,
        {"worker": {"queue": queue}, "model": {"path": f"/models/{MODEL_NAME}"}, "tests": tests or {"timeoutS": 20}},
    )
    pod = hook_pod(render(values))
    assert pod is not None
    return pod


async def run_hook(pod: dict[str, Any], files: dict[str, Path]) -> tuple[int, list[str]]:
    """Run the Pod's command here; ``files`` maps each mounted Secret file's name (``amqp-url``, ``ca.crt``, ...)
    to a local file holding it. Returns the exit status and the output lines."""
    (container,) = pod["spec"]["containers"]
    python, *args = container["command"]
    assert python == "python"
    env = {k: v for k, v in child_env("unused").items() if k != "AMQP_URL"}
    for entry in container["env"]:
        env[entry["name"]] = str(files[Path(entry["value"]).name])
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=REPO_ROOT
    )
    out, _ = await asyncio.wait_for(process.communicate(), HOOK_TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, out.decode().splitlines()


@pytest.fixture
def url_file(amqp_url: str, tmp_path: Path) -> dict[str, Path]:
    path = tmp_path / "amqp-url"
    path.write_text(amqp_url + "\n")
    return {"amqp-url": path}


async def test_the_hook_passes_on_a_reply_from_the_releases_model(
    amqp_url: str, model: Path, release_queue: str, url_file: dict[str, Path]
) -> None:
    async with running_worker(amqp_url, model, release_queue):
        code, lines = await run_hook(hook(release_queue), url_file)
    assert code == 0, lines
    (line,) = lines
    assert line.startswith(f"PASS: model '{MODEL_NAME}' version '1' answered on queue '{release_queue}' in ")
    assert "embedding FP32 [1, 4]" in line


async def test_the_hook_fails_on_an_error_reply_naming_its_code(
    amqp_url: str, model: Path, release_queue: str, url_file: dict[str, Path]
) -> None:
    request = {"inputs": [{"name": "sentence", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}
    async with running_worker(amqp_url, model, release_queue):
        code, lines = await run_hook(hook(release_queue, {"timeoutS": 20, "request": request}), url_file)
    assert code == 1
    (line,) = lines
    assert line.startswith(f"FAIL: error reply unknown_input on queue '{release_queue}': ")
    assert "check tests.request" in line


async def test_the_hook_fails_when_another_model_answers(
    amqp_url: str, model: Path, release_queue: str, url_file: dict[str, Path]
) -> None:
    async with running_worker(amqp_url, model, release_queue, model_name="someone-else"):
        code, lines = await run_hook(hook(release_queue), url_file)
    assert code == 1
    assert lines == [
        f"FAIL: model 'someone-else' version '1' answered on queue '{release_queue}', not '{MODEL_NAME}' version "
        "'1': workers of another release or model consume this queue"
    ]


async def test_the_hook_fails_when_no_worker_answers_in_time(
    connection: aio_pika.abc.AbstractConnection, release_queue: str, url_file: dict[str, Path]
) -> None:
    channel = await connection.channel()
    await channel.declare_queue(release_queue, durable=False)  # the queue is there, nobody consumes it
    code, lines = await run_hook(hook(release_queue, {"timeoutS": 5}), url_file)
    assert code == 1
    (line,) = lines
    assert line.startswith(f"FAIL: no reply on queue '{release_queue}' within 5 s (")
    assert "kubectl get pods -l app.kubernetes.io/instance=qinfer" in line
    assert "raise tests.timeoutS" in line


async def test_the_hook_fails_when_the_queue_does_not_exist(release_queue: str, url_file: dict[str, Path]) -> None:
    code, lines = await run_hook(hook(release_queue), url_file)
    assert code == 1
    (line,) = lines
    where = re.escape(f"queue '{release_queue}'")
    assert re.match(rf"FAIL: no reply on {where} \(producer exit [1-9][0-9]*\): ", line), line
    assert "NO_ROUTE" in line
    assert "the release's workers declare it when they start" in line


async def test_the_hook_speaks_mutual_tls_with_the_files_the_release_mounts(
    tls_broker: TlsBroker, model: Path, tmp_path: Path
) -> None:
    pki = tls_broker.pki
    queue = f"helmtest.tls.{uuid.uuid4().hex[:8]}"
    tls = {"broker": {"tls": {"enabled": True, "secretName": "broker-tls"}}, "autoscaling": {"enabled": False}}
    pod = hook(queue, base=deep_merge(INSTALL_TIME_TLS_CREDENTIALS, tls))
    url = tmp_path / "amqp-url"
    url.write_text(tls_broker.url())
    files = {"amqp-url": url, "ca.crt": pki.ca, "tls.crt": pki.client.cert, "tls.key": pki.client.key}
    async with running_worker(
        tls_broker.url(), model, queue, ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key
    ):
        code, lines = await run_hook(pod, files)
        assert code == 0, lines
        assert lines[0].startswith(f"PASS: model '{MODEL_NAME}' version '1' answered on queue '{queue}'")
        code, lines = await run_hook(
            pod, {**files, "tls.crt": pki.expired_client.cert, "tls.key": pki.expired_client.key}
        )
    assert code == 1
    (line,) = lines
    assert re.match(rf"FAIL: no reply on queue '{re.escape(queue)}' \(producer exit [1-9][0-9]*\): TLS: ", line), line
    assert "expired" in line
    assert tls_broker.password not in line
