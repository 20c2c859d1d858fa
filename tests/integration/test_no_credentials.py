"""No credential ever shows: not in a log line, an error message, ``/metrics``, a load-test report or a reply.

Runs against the TLS test node, whose user has a random password: a worker at debug level reading its URL
from a file, good and bad requests through the client, a bulk job, a load test given the URL with its password on the
command line, and failures (a wrong password, a TLS refusal) from the worker, the client and the CLI. Every
text any of them produced is searched for the password.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from producer.amqp.tls import TlsOptions
from producer.client.rpc import Client
from producer.wire.errors import BrokerTlsError, ConnectionLostError, ErrorReplyError
from tests.support.models import affine_model
from tests.support.tls_broker import USER, TlsBroker
from tests.support.worker_process import REPO_ROOT, LoggedProcess, WorkerProcess, child_env, worker_command

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def run(*command: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=REPO_ROOT
    )
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


async def test_no_credential_appears_in_logs_errors_metrics_reports_or_replies(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    pki = tls_broker.pki
    secret = tls_broker.password
    url = tls_broker.url()
    wrong_url = url.replace(secret, "wrong-" + secret)
    options = TlsOptions(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
    files = {"AMQP_CA_FILE": str(pki.ca), "AMQP_CERT_FILE": str(pki.client.cert), "AMQP_KEY_FILE": str(pki.client.key)}
    url_file = tmp_path / "amqp-url"
    url_file.write_text(url)
    queue = "secrets.check"
    model = affine_model(tmp_path / "affine.onnx")
    env = {k: v for k, v in child_env(url, {**files, "AMQP_URL_FILE": str(url_file)}).items() if k != "AMQP_URL"}
    seen: dict[str, str] = {}

    port = free_port()
    command = worker_command(model, queue, "--log-level", "debug", http_port=port)
    async with LoggedProcess(command, env=env, http_port=port, name="worker") as worker:
        async with Client(url, queue=queue, tls=options, timeout_s=20) as client:
            reply = await client.infer({"x": np.ones((2, 4), np.float32)})
            seen["reply"] = repr(reply)
            with pytest.raises(ErrorReplyError) as bad:
                await client.infer({"nope": np.ones((1, 4), np.float32)})
            seen["error reply"] = str(bad.value)
        report = tmp_path / "report"
        code, seen["load test output"] = await run(
            sys.executable, "-m", "producer.cli", "load-test", "--amqp-url", url, "--queue", queue,
            "--ca-file", str(pki.ca), "--cert-file", str(pki.client.cert), "--key-file", str(pki.client.key),
            "--payload", "tensor", "--input-name", "x", "--dims", "4", "--mode", "constant", "--rate-per-s", "20",
            "--duration-s", "1", "--drain-timeout-s", "10", "--out", str(report), "--no-progress",
            env=env,
        )  # fmt: skip
        assert code == 0, seen["load test output"]
        for path in sorted(report.iterdir()):
            if path.suffix in (".md", ".json", ".csv"):
                seen[f"report {path.name}"] = path.read_text()
        rows = tmp_path / "rows.jsonl"
        rows.write_text("".join(f'{{"id": "r{i}", "inputs": {{"x": [{i}, 1, 2, 3]}}}}\n' for i in range(5)))
        output = tmp_path / "results.jsonl"
        code, seen["bulk output"] = await run(
            sys.executable, "-m", "producer.cli", "bulk", str(rows), "--output", str(output), "--queue", queue,
            "--no-progress", env={**env, **files},
        )  # fmt: skip
        assert code == 0, seen["bulk output"]  # a bulk job over mutual TLS, its URL from AMQP_URL_FILE
        seen["bulk results"] = output.read_text()
        assert len(seen["bulk results"].splitlines()) == 5
        seen["/metrics"] = await asyncio.to_thread(_metrics, port)
    seen["worker log"] = worker.log_tail(10_000)
    assert "amqps://***@localhost" in seen["worker log"]  # the URL is logged, without its credentials
    assert "command" in seen["report report.json"]

    # Failures: a wrong password, refused by the broker, from the client, the CLI and a worker.
    with pytest.raises(ConnectionLostError) as lost:
        async with Client(wrong_url, queue=queue, tls=options, timeout_s=5):
            pass
    seen["client error"] = str(lost.value)
    assert f"refused the credentials of user '{USER}'" in seen["client error"]
    send = [sys.executable, "-m", "producer.cli", "send", "--amqp-url", wrong_url, "--queue", queue, "--json", "{}"]
    code, seen["send error"] = await run(*send, env={**env, **files})
    assert code == 5  # ExitCode.CONNECTION: the credentials were refused
    failing = WorkerProcess(wrong_url, model, queue, "--connect-timeout-s", "5", env=files, name="wrong-password")
    failing.start()
    try:
        assert failing.wait(30) == 1
    finally:
        failing.stop()
    seen["worker error"] = failing.log_tail(1000)
    assert f"refused the credentials of user '{USER}'" in seen["worker error"]
    with pytest.raises(BrokerTlsError) as refused:
        async with Client(url, queue=queue, tls=TlsOptions(ca_file=pki.ca), timeout_s=5):
            pass
    seen["TLS error"] = str(refused.value)

    for where, text in seen.items():
        assert secret not in text, f"the password shows in the {where}"
    print({where: len(text) for where, text in seen.items()})


def _metrics(port: int) -> str:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())
