"""``producer send``: one request from the command line, its reply printed, an exit status per outcome class.

Each class is caused for real against the real broker (and a real worker where one answers); the rows
of the exit code table are printed at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import aio_pika
import pytest

from producer.exit_codes import ExitCode
from tests.support.models import affine_model
from tests.support.workers import running_worker

pytestmark = pytest.mark.integration

BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 1, 2, 3]}]})
WRONG_INPUT = json.dumps({"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1, 4], "data": [0, 1, 2, 3]}]})


async def _start(amqp_url: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "producer.cli", "send", "--amqp-url", amqp_url, *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ},
    )  # fmt: skip


async def _finish(proc: asyncio.subprocess.Process, stdin: bytes | None = None) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _send(amqp_url: str, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    return await _finish(await _start(amqp_url, *args), stdin)


@pytest.fixture(scope="module")
def table() -> Iterator[list[tuple[str, int, str]]]:
    """Rows (class, exit status, stderr line) added by the tests; printed as the exit code table at the end."""
    rows: list[tuple[str, int, str]] = []
    yield rows
    print("\n\nproducer send: exit status by outcome class (measured against the real broker)")
    print(f"| {'class':<38} | exit | stderr (one line)")
    print(f"|{'-' * 40}|------|{'-' * 40}")
    for name, code, err in sorted(rows, key=lambda r: r[1]):
        print(f"| {name:<38} | {code:>4} | {err[:160]}")


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) <= 1, f"stderr has more than one line: {err!r}"
    return lines[0] if lines else ""


@pytest.fixture
async def idle_queue(connection: aio_pika.abc.AbstractConnection, queue: str) -> str:
    """A queue that exists but that no worker consumes (classic, deleted afterwards)."""
    channel = await connection.channel()
    await channel.declare_queue(queue, auto_delete=False)
    return queue


async def test_a_result_exits_0_with_the_reply_on_stdout(
    amqp_url: str, tmp_path: Path, queue: str, table: list[tuple[str, int, str]]
) -> None:
    async with running_worker(amqp_url, affine_model(tmp_path / "affine.onnx"), queue):
        code, out, err = await _send(amqp_url, "--queue", queue, "--json", BODY)
        code_stdin, out_stdin, _ = await _send(amqp_url, "--queue", queue, stdin=BODY.encode())
    assert (code, code_stdin) == (ExitCode.OK, ExitCode.OK)
    assert json.loads(out)["outputs"][0]["data"] == [1.0, 3.0, 5.0, 7.0]
    assert json.loads(out_stdin)["outputs"][0]["data"] == [1.0, 3.0, 5.0, 7.0]
    assert err == ""
    table.append(("result", code, _one_line(err)))


async def test_an_error_reply_exits_1_with_the_reply_on_stdout_and_its_code_on_stderr(
    amqp_url: str, tmp_path: Path, queue: str, table: list[tuple[str, int, str]]
) -> None:
    async with running_worker(amqp_url, affine_model(tmp_path / "affine.onnx"), queue):
        code, out, err = await _send(amqp_url, "--queue", queue, "--json", WRONG_INPUT)
        bad_code, bad_out, bad_err = await _send(amqp_url, "--queue", queue, stdin=b"{not json")
    assert (code, bad_code) == (ExitCode.ERROR_REPLY, ExitCode.ERROR_REPLY)
    assert json.loads(out)["error"]["code"] == "unknown_input"
    assert _one_line(err).startswith("producer: error reply unknown_input: model 'affine' has no input 'nope'")
    assert json.loads(bad_out)["error"]["code"] == "bad_encoding"
    assert "bad_encoding" in _one_line(bad_err)
    table.append(("error reply (unknown_input)", code, _one_line(err)))


async def test_bad_usage_exits_2_and_sends_nothing(amqp_url: str, table: list[tuple[str, int, str]]) -> None:
    code, out, err = await _send(amqp_url, "--timeout-s", "soon", "--json", "{}")
    assert code == ExitCode.USAGE
    assert out == ""
    assert "--timeout-s" in err
    table.append(("usage (bad flag)", code, err.strip().splitlines()[-1]))


async def test_no_reply_in_time_exits_3(amqp_url: str, idle_queue: str, table: list[tuple[str, int, str]]) -> None:
    code, out, err = await _send(amqp_url, "--queue", idle_queue, "--json", BODY, "--timeout-s", "1")
    assert code == ExitCode.TIMEOUT
    assert out == ""
    assert f"no reply within 1 s; is a worker consuming {idle_queue!r}?" in _one_line(err)
    table.append(("timeout (nobody consumes the queue)", code, _one_line(err)))


async def test_an_unroutable_request_exits_4(amqp_url: str, queue_name: str, table: list[tuple[str, int, str]]) -> None:
    code, out, err = await _send(amqp_url, "--queue", queue_name, "--json", "{}", "--timeout-s", "5")
    assert code == ExitCode.UNROUTABLE
    assert out == ""
    assert f"no queue named {queue_name!r} (NO_ROUTE)" in _one_line(err)
    table.append(("unroutable (no such queue, NO_ROUTE)", code, _one_line(err)))


async def test_an_unreachable_broker_or_refused_credentials_exit_5(
    amqp_url: str, table: list[tuple[str, int, str]]
) -> None:
    parsed = urlparse(amqp_url)
    closed_port = f"amqp://guest:guest@127.0.0.1:1{parsed.path or '/'}"
    code, _, err = await _send(closed_port, "--json", "{}", "--timeout-s", "5")
    assert code == ExitCode.CONNECTION
    assert "127.0.0.1:1" in _one_line(err)
    table.append(("connection (nothing listens)", code, _one_line(err)))
    wrong_password = amqp_url.replace(f":{parsed.password}@", ":not-the-password@")
    code, _, err = await _send(wrong_password, "--json", "{}", "--timeout-s", "5")
    assert code == ExitCode.CONNECTION
    assert "not-the-password" not in err
    assert "credentials" in _one_line(err)
    table.append(("connection (credentials refused)", code, _one_line(err)))


async def test_an_interrupt_while_waiting_exits_130(
    amqp_url: str, connection: aio_pika.abc.AbstractConnection, idle_queue: str, table: list[tuple[str, int, str]]
) -> None:
    channel = await connection.channel()
    queue = await channel.get_queue(idle_queue)
    arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_request(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()  # the request is in: the CLI now waits for a reply that never comes
        if not arrived.done():
            arrived.set_result(None)

    await queue.consume(on_request)
    proc = await _start(amqp_url, "--queue", idle_queue, "--json", BODY, "--timeout-s", "60")
    await asyncio.wait_for(arrived, 30)
    proc.send_signal(signal.SIGINT)
    code, out, err = await _finish(proc)
    assert code == ExitCode.INTERRUPTED
    assert out == ""
    assert _one_line(err) == "producer: interrupted"
    table.append(("interrupted (SIGINT)", code, _one_line(err)))
