"""``producer send``: one request from the command line, its reply printed."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from tests.support.models import affine_model
from tests.support.workers import running_worker

pytestmark = pytest.mark.integration


async def _send(amqp_url: str, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "producer.cli", "send", "--amqp-url", amqp_url, *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_send_prints_the_reply_from_flags_and_from_stdin(amqp_url: str, tmp_path: Path, queue: str) -> None:
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 1, 2, 3]}]})
    async with running_worker(amqp_url, affine_model(tmp_path / "affine.onnx"), queue):
        code, out, _ = await _send(amqp_url, "--queue", queue, "--json", body)
        assert code == 0
        assert json.loads(out)["outputs"][0]["data"] == [1.0, 3.0, 5.0, 7.0]
        code, out, _ = await _send(amqp_url, "--queue", queue, stdin=b"{not json")
        assert code == 0
        assert json.loads(out)["error"]["code"] == "bad_encoding"


async def test_send_to_a_missing_queue_says_so(amqp_url: str, queue_name: str) -> None:
    code, _, err = await _send(amqp_url, "--queue", queue_name, "--json", "{}", "--timeout-s", "5")
    assert code == 1
    assert queue_name in err
