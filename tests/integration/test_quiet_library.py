"""The client library prints nothing unless the application configures logging, and logs through it when it does.

A separate Python process imports ``producer``, makes real calls against a real worker (a result, an
error reply, a metadata request, a request to a queue that does not exist) and exits; its stdout and
stderr are read whole.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from tests.support.models import affine_model
from tests.support.worker_process import REPO_ROOT, child_env
from tests.support.workers import running_worker

pytestmark = pytest.mark.integration

SCRIPT = """
import sys
{setup}
import numpy as np
from producer import Client, ErrorReplyError, PublishRefusedError, SyncClient

url, queue, missing = sys.argv[1:4]
with SyncClient(url, queue=queue, timeout_s=20) as client:
    reply = client.infer({{"x": np.ones((2, 4), np.float32)}})
    assert reply.outputs["y"].tolist() == [[3.0] * 4] * 2, reply.outputs
    try:
        client.infer({{"nope": np.ones((1, 4), np.float32)}})
        raise SystemExit(3)
    except ErrorReplyError as e:
        assert e.code == "unknown_input"
    assert client.metadata().name == "affine"
    try:
        client.infer({{"x": np.ones((1, 4), np.float32)}}, queue=missing)
        raise SystemExit(4)
    except PublishRefusedError:
        pass
"""


async def _run(amqp_url: str, queue: str, missing: str, setup: str = "") -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SCRIPT.format(setup=setup), amqp_url, queue, missing,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=child_env(amqp_url), cwd=REPO_ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    return process.returncode, out, err


async def test_the_client_prints_nothing_to_stdout_or_stderr_unless_logging_is_configured(
    amqp_url: str, tmp_path: Path, queue: str, queue_name: str
) -> None:
    missing = f"{queue_name}.missing"
    async with running_worker(amqp_url, affine_model(tmp_path / "affine.onnx"), queue):
        code, out, err = await _run(amqp_url, queue, missing)
        assert (code, out, err) == (0, b"", b"")
        # The same calls with logging configured by the application: the library's events reach its handler.
        code, out, err = await _run(
            amqp_url, queue, missing, setup="import logging; logging.basicConfig(level=logging.DEBUG)"
        )
    assert code == 0, err.decode()
    assert out == b""
    assert f"DEBUG:qinfer.client:client_connected queue={queue}" in err.decode()
