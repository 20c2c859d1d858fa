"""TLS and mutual TLS against a real TLS-only RabbitMQ node that requires client certificates.

The node (``tls_broker`` in tests/conftest.py) trusts one CA, presents a certificate for ``localhost``
only, and refuses connections without a client certificate signed by its CA. A worker started with
the wrong CA, without a client certificate, or through a host name its certificate does not list
must stop at once with exit status 1 and one line saying which and what to change: no traceback, and
no retry loop reported as an unreachable broker.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from producer.amqp.tls import TlsOptions, connect
from producer.client.rpc import Client
from producer.wire.errors import BrokerTlsError
from tests.support.models import affine_model
from tests.support.tls_broker import Pki, TlsBroker
from tests.support.worker_process import REPO_ROOT, LoggedProcess, WorkerProcess, child_env, worker_command

pytestmark = pytest.mark.integration

EXIT_WITHIN_S = 30.0
"""A worker that retried would still be retrying: its connect timeout is set to ten minutes."""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return affine_model(tmp_path_factory.mktemp("models") / "affine.onnx")


def mutual(pki: Pki) -> TlsOptions:
    """The options that work: the broker's CA, and a client certificate it trusts."""
    return TlsOptions(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)


def tls_env(options: TlsOptions) -> dict[str, str]:
    env = {"AMQP_CA_FILE": "", "AMQP_CERT_FILE": "", "AMQP_KEY_FILE": ""}
    for name, path in (
        ("AMQP_CA_FILE", options.ca_file),
        ("AMQP_CERT_FILE", options.cert_file),
        ("AMQP_KEY_FILE", options.key_file),
    ):
        if path is not None:
            env[name] = str(path)
    return env


async def test_a_worker_and_the_client_round_trip_over_mutual_tls(
    tls_broker: TlsBroker, model: Path, tmp_path: Path
) -> None:
    queue = f"tls.{uuid.uuid4().hex[:8]}"
    url_file = tmp_path / "amqp-url"
    url_file.write_text(tls_broker.url() + "\n")
    env = child_env(tls_broker.url(), {**tls_env(mutual(tls_broker.pki)), "AMQP_URL_FILE": str(url_file)})
    del env["AMQP_URL"]  # the URL comes from the file only, as the chart mounts it
    async with LoggedProcess(worker_command(model, queue), env=env, name="tls-worker") as worker:
        started = worker.events("worker_started")[0]
        assert started["tls"] == "mutual"
        assert started["broker"] == f"amqps://***@localhost:{tls_broker.tls_port}/"
        async with Client(tls_broker.url(), queue=queue, tls=mutual(tls_broker.pki), timeout_s=20) as client:
            reply = await client.infer({"x": np.arange(8, dtype=np.float32).reshape(2, 4)})
    np.testing.assert_array_equal(reply.outputs["y"], 2 * np.arange(8, dtype=np.float32).reshape(2, 4) + 1)


FAILURES: dict[str, tuple[Callable[[TlsBroker], str], Callable[[Pki], TlsOptions], str]] = {
    "unknown CA": (
        lambda b: b.url(),
        lambda p: TlsOptions(ca_file=p.other_ca, cert_file=p.client.cert, key_file=p.client.key),
        "TLS unknown CA: the broker's certificate at localhost:{port} is not signed by a CA in AMQP_CA_FILE",
    ),
    "missing client certificate": (
        lambda b: b.url(),
        lambda p: TlsOptions(ca_file=p.ca),
        "TLS: the broker at localhost:{port} requires a client certificate and none was sent; set AMQP_CERT_FILE",
    ),
    "host name mismatch": (
        lambda b: b.url("127.0.0.1"),
        mutual,
        "TLS host name mismatch: the broker's certificate at 127.0.0.1:{port} is not valid for '127.0.0.1'",
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_tls_failure_stops_the_worker_at_once_with_one_line_saying_what_to_change(
    tls_broker: TlsBroker, model: Path, case: str
) -> None:
    url_for, options_for, expected = FAILURES[case]
    url = url_for(tls_broker)
    worker = WorkerProcess(
        url, model, "tls.never", "--connect-timeout-s", "600", env=tls_env(options_for(tls_broker.pki)), name=case
    )
    worker.start()
    try:
        code = worker.wait(EXIT_WITHIN_S)
    finally:
        worker.stop()
    assert code == 1, worker.log_tail()
    events = worker.events()
    loud = [e for e in events if e.get("level") in ("warning", "error", "critical")]
    assert [e["event"] for e in loud] == ["worker_failed"], worker.log_tail()
    print(f"{case}: {loud[0]['error']}")
    assert loud[0]["error"].startswith(expected.format(port=tls_broker.tls_port))
    assert all(e["event"] != "unparsed" for e in events), worker.log_tail()  # no traceback, no stray output
    assert tls_broker.password not in worker.log_tail(1000)


@pytest.mark.parametrize(
    ("client", "complaint"),
    [
        ("expired_client", "refused the client certificate {cert} because it has expired"),
        ("other_client", "refused the client certificate {cert} (TLSV1_ALERT_UNKNOWN_CA)"),
    ],
)
async def test_a_client_certificate_the_broker_refuses_is_named_with_the_reason(
    tls_broker: TlsBroker, client: str, complaint: str
) -> None:
    issued = getattr(tls_broker.pki, client)
    options = TlsOptions(ca_file=tls_broker.pki.ca, cert_file=issued.cert, key_file=issued.key)
    with pytest.raises(BrokerTlsError) as raised:
        await connect(tls_broker.url(), options, timeout=10)
    assert complaint.format(cert=issued.cert) in str(raised.value)


async def test_without_the_host_name_check_the_ca_still_decides(tls_broker: TlsBroker) -> None:
    pki = tls_broker.pki
    unchecked = TlsOptions(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key, verify_hostname=False)
    connection = await connect(tls_broker.url("127.0.0.1"), unchecked, timeout=10)
    await connection.close()
    wrong_ca = TlsOptions(
        ca_file=pki.other_ca, cert_file=pki.client.cert, key_file=pki.client.key, verify_hostname=False
    )
    with pytest.raises(BrokerTlsError, match="TLS unknown CA"):
        await connect(tls_broker.url("127.0.0.1"), wrong_ca, timeout=10)


async def test_producer_send_speaks_mutual_tls_and_says_what_is_wrong_when_it_cannot(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    import asyncio

    pki = tls_broker.pki
    url_file = tmp_path / "url"
    url_file.write_text(tls_broker.url())
    base = [sys.executable, "-m", "producer.cli", "send", "--amqp-url-file", str(url_file), "--queue", "tls.none"]
    env = {k: v for k, v in child_env("unused").items() if k != "AMQP_URL"}

    async def send(*flags: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            *base, *flags, "--json", "{}", "--timeout-s", "5",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=REPO_ROOT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out.decode()

    code, out = await send(
        "--ca-file", str(pki.ca), "--cert-file", str(pki.client.cert), "--key-file", str(pki.client.key)
    )
    assert code == 4  # ExitCode.UNROUTABLE
    assert "no queue named 'tls.none' (NO_ROUTE)" in out  # connected over mutual TLS; the broker refused the publish
    code, out = await send("--ca-file", str(pki.ca))
    assert code == 5  # ExitCode.CONNECTION: the TLS handshake was refused
    assert out.splitlines() == [out.strip()]
    assert "requires a client certificate and none was sent" in out
    assert tls_broker.password not in out
