"""TLS to the broker: the one place that turns a URL and certificate files into a connection.

Every connection the project opens (the worker's, the client's, bulk jobs', the load test's and
``producer send``'s) goes through :func:`connect` or :func:`connect_robust`. An ``amqps://`` URL gets
an :class:`ssl.SSLContext` built here from :class:`TlsOptions`: the CA bundle that vouches for the
broker (default: the system's CA store), an optional client certificate and key for mutual TLS, and
the broker's host name checked against its certificate (on unless explicitly turned off, which is
logged as a warning each time a context is built).

A failed handshake becomes one :class:`~producer.wire.errors.BrokerTlsError` whose message says what was
wrong (unknown CA, expired certificate, host name mismatch, client certificate missing or refused)
and what to change. A broker that refuses a client certificate under TLS 1.3 does so after the
handshake, so the client only sees the connection reset; a short probe connection (:func:`probe`)
then reads the broker's TLS alert to say which.

Options come from ``AMQP_CA_FILE``, ``AMQP_CERT_FILE``, ``AMQP_KEY_FILE`` and
``AMQP_TLS_VERIFY_HOSTNAME`` (:meth:`TlsOptions.from_env`), or from the CLIs' flags
(:func:`add_arguments`, :func:`options_from_args`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.exceptions
from yarl import URL

from producer.amqp.logs import get_logger
from producer.wire.errors import BrokerTlsError

__all__ = [
    "TlsOptions",
    "add_arguments",
    "connect",
    "connect_robust",
    "describe_failure",
    "find_tls_error",
    "https_context",
    "is_tls_url",
    "options_from_args",
    "probe",
    "ssl_context",
]

log = get_logger("tls")

ENV_CA_FILE = "AMQP_CA_FILE"
ENV_CERT_FILE = "AMQP_CERT_FILE"
ENV_KEY_FILE = "AMQP_KEY_FILE"
ENV_VERIFY_HOSTNAME = "AMQP_TLS_VERIFY_HOSTNAME"

PROBE_TIMEOUT_S = 2.0
"""How long :func:`probe` waits for the TLS handshake, then for an alert after it."""

DEFAULT_TLS_PORT = 5671

# aiormq reads TLS files from these URL query parameters when it builds the context itself; this
# module always builds it, so they would be silently ignored.
_URL_TLS_PARAMETERS = ("cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl")

# OpenSSL's X509_V_ERR_* codes, as ssl.SSLCertVerificationError.verify_code carries them.
_UNKNOWN_ISSUER = {2, 18, 19, 20, 21}
_NOT_YET_VALID = 9
_EXPIRED = 10
_HOST_MISMATCH = {62, 64}

# Errors that mean "the broker closed the connection": under TLS 1.3 a refused client certificate looks so.
_CLOSED = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, EOFError)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TlsOptions:
    """How to verify the broker and prove who we are, for ``amqps://`` URLs.

    Args:
        ca_file: PEM bundle of the CAs that may sign the broker's certificate; None: the system's CA store.
        cert_file: PEM client certificate for mutual TLS (the chain may follow it); None: no client certificate.
        key_file: PEM private key of ``cert_file`` (unencrypted); None: the key is in ``cert_file``.
        verify_hostname: check that the broker's certificate names the URL's host. Turn it off for test rigs
            only: any certificate the CA signed is then accepted, whatever host it names.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    verify_hostname: bool = True

    def __post_init__(self) -> None:
        if self.key_file is not None and self.cert_file is None:
            raise BrokerTlsError(
                f"{ENV_KEY_FILE} (--key-file) is set but {ENV_CERT_FILE} (--cert-file) is not: a client key needs "
                "its certificate"
            )

    @property
    def configured(self) -> bool:
        """True when anything differs from the defaults (files given, or the host name check off)."""
        return self != TlsOptions()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TlsOptions:
        """Options from ``AMQP_CA_FILE``, ``AMQP_CERT_FILE``, ``AMQP_KEY_FILE``, ``AMQP_TLS_VERIFY_HOSTNAME``."""
        env = os.environ if env is None else env

        def path(name: str) -> Path | None:
            value = env.get(name, "").strip()
            return Path(value) if value else None

        return cls(
            ca_file=path(ENV_CA_FILE),
            cert_file=path(ENV_CERT_FILE),
            key_file=path(ENV_KEY_FILE),
            verify_hostname=_truth(env.get(ENV_VERIFY_HOSTNAME, "true"), ENV_VERIFY_HOSTNAME),
        )


def _truth(text: str, name: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise BrokerTlsError(f"{name} is {text!r}; use true or false")


def is_tls_url(url: str) -> bool:
    """True for an ``amqps://`` URL."""
    return url.strip().lower().startswith("amqps://")


def _where(url: str) -> str:
    """``host:port`` of ``url``, never its credentials."""
    parsed = URL(url)
    default = DEFAULT_TLS_PORT if is_tls_url(url) else 5672
    return f"{parsed.host or '?'}:{parsed.port or default}"


def ssl_context(url: str, options: TlsOptions) -> ssl.SSLContext | None:
    """The SSL context for ``url``: None for ``amqp://`` (no TLS), else one built from ``options``.

    Raises:
        BrokerTlsError: when TLS files are given for a plain ``amqp://`` URL, when the URL carries TLS
            query parameters (use the options instead), or when a file cannot be used.
    """
    if not is_tls_url(url):
        if options.configured:
            raise BrokerTlsError(
                f"TLS settings are given ({_describe_options(options)}) but the broker URL for {_where(url)} is "
                "amqp://, which does not use TLS: use amqps:// and the broker's TLS port (5671 by default)"
            )
        return None
    found = sorted(set(_URL_TLS_PARAMETERS) & set(URL(url).query))
    if found:
        raise BrokerTlsError(
            f"the broker URL carries TLS query parameters ({', '.join(found)}), which are not used: set "
            f"{ENV_CA_FILE}, {ENV_CERT_FILE}, {ENV_KEY_FILE} (or --ca-file, --cert-file, --key-file) instead"
        )
    return https_context(options, where=_where(url))


def https_context(options: TlsOptions, *, where: str) -> ssl.SSLContext:
    """An SSL context from ``options`` for any TLS connection to the broker's machines (also its ``https://``
    management API); ``where`` (host:port) names the peer in the host-name warning.

    Raises:
        BrokerTlsError: when a file cannot be used.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if options.ca_file is not None:
            context.load_verify_locations(cafile=str(options.ca_file))
    except (OSError, ssl.SSLError) as e:
        raise BrokerTlsError(
            f"cannot use {ENV_CA_FILE} ({options.ca_file}): {_reason(e)}; it must be a readable PEM file of CA "
            "certificates"
        ) from None
    if options.cert_file is not None:
        try:
            context.load_cert_chain(str(options.cert_file), None if options.key_file is None else str(options.key_file))
        except (OSError, ssl.SSLError) as e:
            raise BrokerTlsError(
                f"cannot use the client certificate {ENV_CERT_FILE} ({options.cert_file}) with {ENV_KEY_FILE} "
                f"({options.key_file or 'in the certificate file'}): {_reason(e)}; both must be readable PEM files, "
                "the key unencrypted and matching the certificate"
            ) from None
    if not options.verify_hostname:
        context.check_hostname = False
        log.warning(
            "tls_hostname_not_verified",
            broker=where,
            why=f"{ENV_VERIFY_HOSTNAME}=false: any certificate the CA signed is accepted, whatever host it names",
            fix=f"for test rigs only; remove {ENV_VERIFY_HOSTNAME} (or --no-tls-verify-hostname) elsewhere",
        )
    return context


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


def _describe_options(options: TlsOptions) -> str:
    parts = [
        f"{name}={value}"
        for name, value in (
            (ENV_CA_FILE, options.ca_file),
            (ENV_CERT_FILE, options.cert_file),
            (ENV_KEY_FILE, options.key_file),
        )
        if value is not None
    ]
    if not options.verify_hostname:
        parts.append(f"{ENV_VERIFY_HOSTNAME}=false")
    return ", ".join(parts)


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and its causes and contexts, each once (chains can loop)."""
    seen: list[BaseException] = []
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if any(current is s for s in seen):
            continue
        seen.append(current)
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
    return seen


def find_tls_error(error: BaseException) -> ssl.SSLError | None:
    """The :class:`ssl.SSLError` behind ``error`` (aiormq wraps it), or None when TLS is not what failed."""
    return next((e for e in _chain(error) if isinstance(e, ssl.SSLError)), None)


def _closed_by_peer(error: BaseException) -> bool:
    return any(isinstance(e, (*_CLOSED, aiormq.exceptions.IncompatibleProtocolError)) for e in _chain(error))


async def probe(url: str, context: ssl.SSLContext, timeout_s: float = PROBE_TIMEOUT_S) -> ssl.SSLError | None:
    """Handshake with the broker and wait briefly for a TLS alert, sending nothing.

    A broker refusing the client certificate under TLS 1.3 sends its alert after the handshake; a
    client that has already written its protocol header may see only a reset instead. Here nothing is
    written, so the alert arrives as an :class:`ssl.SSLError`. Returns it, or None when the broker
    accepted the session (it stays silent until the client speaks) or could not be reached.
    """
    parsed = URL(url)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parsed.host, parsed.port or DEFAULT_TLS_PORT, ssl=context), timeout_s
        )
    except ssl.SSLError as e:
        return e
    except (OSError, TimeoutError):
        return None
    try:
        await asyncio.wait_for(reader.read(1), timeout_s)
    except ssl.SSLError as e:
        return e
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return None


def describe_failure(url: str, error: ssl.SSLError, options: TlsOptions) -> str:
    """One sentence saying why the TLS handshake with ``url``'s broker failed and what to change.

    Never includes the URL's credentials: only its host and port.
    """
    where = _where(url)
    host = URL(url).host or "?"
    if isinstance(error, ssl.SSLCertVerificationError):
        code, detail = error.verify_code, error.verify_message
        if code in _HOST_MISMATCH:
            return (
                f"TLS host name mismatch: the broker's certificate at {where} is not valid for {host!r} ({detail}); "
                f"connect with a host name the certificate lists (its subjectAltName) or reissue it for {host!r} "
                f"({ENV_VERIFY_HOSTNAME}=false skips this check, for test rigs only)"
            )
        if code == _EXPIRED:
            return f"TLS: the broker's certificate at {where} has expired; renew it on the broker (its certfile)"
        if code == _NOT_YET_VALID:
            return (
                f"TLS: the broker's certificate at {where} is not valid yet; check the clocks here and on the broker, "
                "or reissue the certificate"
            )
        if code in _UNKNOWN_ISSUER:
            trusted = (
                f"{ENV_CA_FILE} ({options.ca_file})"
                if options.ca_file
                else f"the system's CA store ({ENV_CA_FILE} is not set)"
            )
            return (
                f"TLS unknown CA: the broker's certificate at {where} is not signed by a CA in {trusted} ({detail}); "
                f"set {ENV_CA_FILE} (--ca-file) to the CA bundle that signed the broker's certificate"
            )
        return f"TLS: the broker's certificate at {where} was refused ({detail}); check it and {ENV_CA_FILE}"
    reason = str(error.reason or error)
    if reason in ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE") and options.cert_file is None:
        return (
            f"TLS: the broker at {where} requires a client certificate and none was sent; set {ENV_CERT_FILE} and "
            f"{ENV_KEY_FILE} (--cert-file, --key-file) to a certificate signed by a CA the broker trusts"
        )
    if reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED":
        return (
            f"TLS: the broker at {where} refused the client certificate {options.cert_file} because it has expired; "
            f"renew it and point {ENV_CERT_FILE} at the new one"
        )
    if reason in (
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
    ):
        return (
            f"TLS: the broker at {where} refused the client certificate {options.cert_file} ({reason}); use a "
            "certificate signed by a CA the broker trusts (its ssl_options.cacertfile)"
        )
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNEXPECTED_EOF_WHILE_READING"):
        return (
            f"TLS: {where} does not answer TLS ({reason}); amqps:// needs the broker's TLS port (5671 by default), "
            "plain amqp:// its AMQP port (5672)"
        )
    return (
        f"TLS: the handshake with the broker at {where} failed ({reason}); check {ENV_CA_FILE}, {ENV_CERT_FILE} and "
        f"{ENV_KEY_FILE}"
    )


async def _tls_failure(url: str, error: BaseException, context: ssl.SSLContext, options: TlsOptions) -> str | None:
    found = find_tls_error(error)
    if found is None and _closed_by_peer(error):
        found = await probe(url, context)
    return None if found is None else describe_failure(url, found, options)


async def connect(url: str, options: TlsOptions | None = None, **kwargs: Any) -> aio_pika.abc.AbstractConnection:
    """``aio_pika.connect(url, **kwargs)``, over TLS as ``options`` say for an ``amqps://`` URL.

    Raises:
        BrokerTlsError: when the TLS files cannot be used or the handshake fails (never worth retrying).
        Whatever ``aio_pika.connect`` raises for other failures (unreachable broker, rejected credentials).
    """
    connection: aio_pika.abc.AbstractConnection = await _open(aio_pika.connect, url, options, kwargs)
    return connection


async def connect_robust(
    url: str, options: TlsOptions | None = None, **kwargs: Any
) -> aio_pika.abc.AbstractRobustConnection:
    """:func:`connect` for ``aio_pika.connect_robust``: the context is kept for every reconnection."""
    connection: aio_pika.abc.AbstractRobustConnection = await _open(aio_pika.connect_robust, url, options, kwargs)
    return connection


async def _open(
    opener: Callable[..., Awaitable[Any]], url: str, options: TlsOptions | None, kwargs: dict[str, Any]
) -> Any:
    """Open a connection with ``opener``, turning a failed TLS handshake into one :class:`BrokerTlsError`."""
    options = options or TlsOptions()
    context = ssl_context(url, options)
    if context is not None:
        kwargs["ssl_context"] = context
    try:
        return await opener(url, **kwargs)
    except Exception as e:
        message = None if context is None else await _tls_failure(url, e, context, options)
        if message is None:
            raise
        raise BrokerTlsError(message) from e


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--amqp-url-file``, ``--ca-file``, ``--cert-file``, ``--key-file`` and ``--no-tls-verify-hostname``."""
    parser.add_argument(
        "--amqp-url-file",
        type=Path,
        default=None,
        help="file holding the broker URL with its credentials, e.g. a mounted Secret (env AMQP_URL_FILE)",
    )
    parser.add_argument("--ca-file", type=Path, default=None, help=f"PEM CA bundle for amqps:// (env {ENV_CA_FILE})")
    parser.add_argument(
        "--cert-file", type=Path, default=None, help=f"PEM client certificate, mutual TLS (env {ENV_CERT_FILE})"
    )
    parser.add_argument("--key-file", type=Path, default=None, help=f"PEM key of --cert-file (env {ENV_KEY_FILE})")
    parser.add_argument(
        "--no-tls-verify-hostname",
        dest="tls_verify_hostname",
        action="store_false",
        default=None,
        help=f"do not check the broker's host name against its certificate: test rigs only (env {ENV_VERIFY_HOSTNAME})",
    )


def options_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> TlsOptions:
    """TLS options from the flags of :func:`add_arguments`; each flag wins over its environment variable."""
    from_env = TlsOptions.from_env(env)
    verify = getattr(args, "tls_verify_hostname", None)
    return TlsOptions(
        ca_file=getattr(args, "ca_file", None) or from_env.ca_file,
        cert_file=getattr(args, "cert_file", None) or from_env.cert_file,
        key_file=getattr(args, "key_file", None) or from_env.key_file,
        verify_hostname=from_env.verify_hostname if verify is None else verify,
    )
