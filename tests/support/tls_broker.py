"""A second, TLS-only RabbitMQ node for tests, with certificates made on the spot.

:func:`make_pki` writes a CA, a server certificate for ``localhost`` (not for ``127.0.0.1``, so
connecting by IP address is a host name mismatch), a client certificate signed by that CA, an
expired client certificate, and a second CA with its own client certificate that the broker does
not trust. :class:`TlsBroker` starts ``rabbitmq-server`` in the foreground as a child process with
its own node name, ports, configuration, database and logs in a temporary folder, listening only
for TLS and requiring a client certificate (``fail_if_no_peer_cert``), and stops it with
``rabbitmqctl stop`` (then by signal, should that fail).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NODE_PREFIX = "qinfer-tls"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
USER = "qinfer-tls-user"


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Every file the TLS tests use."""

    ca: Path
    server: Issued
    client: Issued
    expired_client: Issued
    other_ca: Path
    other_client: Issued


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    key_cert_sign=True,
    crl_sign=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    encipher_only=False,
    decipher_only=False,
)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _ca(folder: Path, common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = folder / f"{common_name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def _issue(
    folder: Path,
    name: str,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    *,
    server: bool,
    expired: bool = False,
) -> Issued:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    start, end = (now - 10 * day, now - day) if expired else (now - day, now + 30 * day)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    issued = Issued(folder / f"{name}.pem", folder / f"{name}.key")
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, issued.key)
    return issued


def make_pki(folder: Path) -> Pki:
    """Write a CA, server and client certificates (and the wrong ones the tests need) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert, ca_path = _ca(folder, "qinfer-test-ca")
    other_key, other_cert, other_path = _ca(folder, "qinfer-other-ca")
    return Pki(
        ca=ca_path,
        server=_issue(folder, "server", (ca_key, ca_cert), server=True),
        client=_issue(folder, "client", (ca_key, ca_cert), server=False),
        expired_client=_issue(folder, "expired-client", (ca_key, ca_cert), server=False, expired=True),
        other_ca=other_path,
        other_client=_issue(folder, "other-client", (other_key, other_cert), server=False),
    )


def free_port() -> int:
    """A TCP port nothing listens on right now (on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rabbitmq_bin(script: str) -> str | None:
    """Path of a RabbitMQ script, preferring the package's own copy over a wrapper that switches user."""
    packaged = Path("/usr/lib/rabbitmq/bin") / script
    if packaged.is_file() and os.access(packaged, os.X_OK):
        return str(packaged)
    return shutil.which(script)


class TlsBroker:
    """A TLS-only RabbitMQ node of our own (see the module docstring). Use as a context manager.

    Args:
        folder: a fresh temporary folder for its configuration, database and logs.
        pki: the certificates (see :func:`make_pki`).
    """

    def __init__(self, folder: Path, pki: Pki) -> None:
        self.folder = folder
        self.pki = pki
        self.tls_port = free_port()
        self.tcp_port = free_port()
        self.dist_port = free_port()
        self.password = "pw-" + secrets.token_hex(12)
        # Unique per test run, so concurrent runs (other checkouts) and a node left by a killed run never clash.
        self.node = f"{NODE_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}@localhost"
        self._process: subprocess.Popen[bytes] | None = None
        self._env = self._environment()

    def url(self, host: str = "localhost") -> str:
        """The ``amqps://`` URL of this node, credentials included."""
        return f"amqps://{USER}:{self.password}@{host}:{self.tls_port}/"

    def _environment(self) -> dict[str, str]:
        home = self.folder / "home"
        home.mkdir(parents=True, exist_ok=True)
        config = self.folder / "rabbitmq.conf"
        config.write_text(
            "\n".join(
                [
                    f"listeners.tcp.default = 127.0.0.1:{self.tcp_port}",
                    f"listeners.ssl.default = {self.tls_port}",
                    f"ssl_options.cacertfile = {self.pki.ca}",
                    f"ssl_options.certfile = {self.pki.server.cert}",
                    f"ssl_options.keyfile = {self.pki.server.key}",
                    "ssl_options.verify = verify_peer",
                    "ssl_options.fail_if_no_peer_cert = true",
                    f"default_user = {USER}",
                    f"default_pass = {self.password}",
                    "log.console = false",
                    "log.file.level = warning",
                ]
            )
            + "\n"
        )
        plugins = self.folder / "enabled_plugins"
        plugins.write_text("[].\n")
        env_file = self.folder / "rabbitmq-env.conf"
        env_file.write_text("")
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.tcp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_CONF_ENV_FILE": str(env_file),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.folder / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            "RABBITMQ_PID_FILE": str(self.folder / "node.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self) -> None:
        """Start the node and wait until its TLS listener completes a handshake."""
        server = rabbitmq_bin("rabbitmq-server")
        if server is None:
            raise FileNotFoundError("rabbitmq-server")
        with (self.folder / "stdout.log").open("wb") as output:
            self._process = subprocess.Popen(
                [server],
                env=self._env,
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._handshake_ok():
            if self._process.poll() is not None:
                raise RuntimeError(f"the TLS test node exited at start ({self._process.returncode}): {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the TLS test node did not listen within {START_TIMEOUT_S:g} s: {self.log_tail()}")
            time.sleep(0.2)

    def _handshake_ok(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(self.pki.client.cert), str(self.pki.client.key))
        try:
            with (
                socket.create_connection(("127.0.0.1", self.tls_port), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(b"AMQP\x00\x00\x09\x01")
                return bool(tls.recv(8))
        except OSError:
            return False

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n <this node> ARGS``."""
        ctl = rabbitmq_bin("rabbitmqctl") or "rabbitmqctl"
        return subprocess.run(
            [ctl, "-n", self.node, *args], env=self._env, capture_output=True, text=True, timeout=STOP_TIMEOUT_S
        )

    def stop(self) -> None:
        """Stop the node (``rabbitmqctl stop``; SIGTERM, then SIGKILL to its process group if that fails)."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            self.ctl("stop")
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for signum in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signum)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(10)
                    break

    def log_tail(self, lines: int = 20) -> str:
        found = [*sorted((self.folder / "log").glob("*.log")), self.folder / "stdout.log"]
        text = "\n".join(p.read_text(errors="replace") for p in found if p.is_file())
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> TlsBroker:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
