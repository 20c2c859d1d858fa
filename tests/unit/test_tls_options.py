"""TLS options, broker URLs from files, and the sentences a TLS failure turns into (no broker needed)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from producer.amqp.tls import TlsOptions, describe_failure, find_tls_error, ssl_context
from producer.amqp.urls import broker_url, read_url_file, redact_argv
from producer.wire.errors import BrokerTlsError
from tests.support.tls_broker import Pki, make_pki
from worker.settings import Settings, SettingsError

URL = "amqps://svc-user:s3cr3t-pw@rabbit.example:5671/"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_plain_amqp_gets_no_context_and_tls_files_for_it_are_refused(pki: Pki) -> None:
    assert ssl_context("amqp://u:p@host/", TlsOptions()) is None
    with pytest.raises(BrokerTlsError, match=r"amqp://, which does not use TLS: use amqps://"):
        ssl_context("amqp://u:p@host/", TlsOptions(ca_file=pki.ca))


def test_amqps_verifies_the_host_name_and_the_chain_by_default(pki: Pki) -> None:
    context = ssl_context(URL, TlsOptions(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key))
    assert context is not None
    assert context.check_hostname
    assert context.verify_mode is ssl.CERT_REQUIRED


def test_turning_the_host_name_check_off_keeps_the_chain_check(pki: Pki) -> None:
    context = ssl_context(URL, TlsOptions(ca_file=pki.ca, verify_hostname=False))
    assert context is not None
    assert not context.check_hostname
    assert context.verify_mode is ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        (lambda p: TlsOptions(ca_file=p.ca.parent / "missing.pem"), r"cannot use AMQP_CA_FILE .*missing\.pem"),
        (lambda p: TlsOptions(ca_file=p.client.key), r"cannot use AMQP_CA_FILE"),
        (lambda p: TlsOptions(cert_file=p.client.cert, key_file=p.server.key), r"the key unencrypted and matching"),
    ],
    ids=["missing CA file", "a key as CA file", "key of another certificate"],
)
def test_unusable_files_are_named_with_what_they_must_be(pki: Pki, options: object, complaint: str) -> None:
    with pytest.raises(BrokerTlsError, match=complaint) as raised:
        ssl_context(URL, options(pki))  # type: ignore[operator]
    assert "s3cr3t-pw" not in str(raised.value)


def test_a_key_without_its_certificate_is_refused(pki: Pki) -> None:
    with pytest.raises(BrokerTlsError, match="a client key needs its certificate"):
        TlsOptions(key_file=pki.client.key)


def test_tls_query_parameters_in_the_url_are_refused_rather_than_ignored() -> None:
    with pytest.raises(BrokerTlsError, match=r"\(cafile, no_verify_ssl\), which are not used: set AMQP_CA_FILE"):
        ssl_context(URL + "?cafile=/ca.pem&no_verify_ssl=1", TlsOptions())


def verification_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    error.verify_code, error.verify_message = code, message
    return error


def alert(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] alert")
    error.reason = reason
    return error


@pytest.mark.parametrize(
    ("error", "options", "sentence"),
    [
        (verification_error(20, "unable to get local issuer certificate"), TlsOptions(), "TLS unknown CA"),
        (verification_error(10, "certificate has expired"), TlsOptions(), "certificate at rabbit.example:5671 has exp"),
        (verification_error(62, "Hostname mismatch"), TlsOptions(), "TLS host name mismatch"),
        (alert("TLSV13_ALERT_CERTIFICATE_REQUIRED"), TlsOptions(), "requires a client certificate and none was"),
        (alert("TLSV1_ALERT_UNKNOWN_CA"), TlsOptions(cert_file=Path("/c.pem")), "refused the client certificate /c"),
        (alert("SSLV3_ALERT_CERTIFICATE_EXPIRED"), TlsOptions(cert_file=Path("/c.pem")), "because it has expired"),
        (alert("WRONG_VERSION_NUMBER"), TlsOptions(), "does not answer TLS"),
    ],
)
def test_each_tls_failure_becomes_one_sentence_without_credentials(
    error: ssl.SSLError, options: TlsOptions, sentence: str
) -> None:
    text = describe_failure(URL, error, options)
    assert sentence in text
    assert "\n" not in text
    assert "s3cr3t-pw" not in text
    assert "svc-user" not in text


def test_the_ssl_error_is_found_behind_the_wrappers_even_in_a_looping_chain() -> None:
    inner = alert("TLSV1_ALERT_UNKNOWN_CA")
    outer = ConnectionError("wrapped")
    outer.__cause__ = inner
    inner.__context__ = outer
    assert find_tls_error(outer) is inner
    assert find_tls_error(ConnectionResetError()) is None


def test_the_url_comes_from_a_file_and_the_file_is_never_echoed(tmp_path: Path) -> None:
    good = tmp_path / "url"
    good.write_text(URL + "\n")
    assert read_url_file(good) == URL
    assert broker_url(env={"AMQP_URL_FILE": str(good)}) == URL
    assert broker_url(url="amqp://flag/", env={"AMQP_URL_FILE": str(good)}) == "amqp://flag/"
    with pytest.raises(ValueError, match="both set"):
        broker_url(env={"AMQP_URL_FILE": str(good), "AMQP_URL": URL})
    bad = tmp_path / "bad"
    bad.write_text("s3cr3t-pw\n")
    with pytest.raises(ValueError, match="must hold one broker URL") as raised:
        read_url_file(bad)
    assert "s3cr3t-pw" not in str(raised.value)
    with pytest.raises(ValueError, match=r"cannot read AMQP_URL_FILE \(.*nowhere\)"):
        read_url_file(tmp_path / "nowhere")


def test_worker_settings_read_the_url_file_and_check_the_tls_files(tmp_path: Path, pki: Pki) -> None:
    url_file = tmp_path / "url"
    url_file.write_text(URL)
    settings = Settings.from_env({"AMQP_URL_FILE": str(url_file), "AMQP_CA_FILE": str(pki.ca)})
    assert settings.amqp_url == URL
    assert "s3cr3t-pw" not in repr(settings)
    assert settings.tls.ca_file == pki.ca
    with pytest.raises(SettingsError, match="both set"):
        Settings.from_env({"AMQP_URL_FILE": str(url_file), "AMQP_URL": "amqp://other/"})
    with pytest.raises(SettingsError, match=r"AMQP_CERT_FILE \(--cert-file\) is .*nothere.pem, which is not"):
        Settings.from_env({"AMQP_URL": URL, "AMQP_CERT_FILE": str(tmp_path / "nothere.pem")})
    with pytest.raises(SettingsError, match="but the broker URL is amqp://"):
        Settings.from_env({"AMQP_URL": "amqp://u:p@h/", "AMQP_CA_FILE": str(pki.ca)})


def test_command_lines_in_reports_lose_their_credentials() -> None:
    argv = ["load-test", "--amqp-url", URL, "--management-url=http://admin:hunter2@mgmt:15672", "--queue", "q"]
    text = " ".join(redact_argv(argv))
    assert "s3cr3t-pw" not in text
    assert "hunter2" not in text
    assert "--management-url=http://***@mgmt:15672" in text
