"""Broker URLs as people may see them: never with their credentials; and where a URL comes from."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import aiormq.exceptions

from producer.wire.names import DEFAULT_AMQP_URL

__all__ = ["broker_url", "connect_failure", "read_url_file", "redact_argv", "redact_url"]

ENV_URL = "AMQP_URL"
ENV_URL_FILE = "AMQP_URL_FILE"


def redact_url(url: str) -> str:
    """``url`` with its user information replaced by ``***``, for logs, errors and reports.

    The user information ends at the *last* ``@`` of the URL, so a password that holds an unescaped
    ``@`` is hidden too (erring towards hiding part of a path rather than any of a password).
    """
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return scheme + sep + rest


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with the credentials of every URL in it hidden (``--amqp-url=...`` forms too)."""
    redacted = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if eq and flag.startswith("--") and "://" in value:
            redacted.append(f"{flag}={redact_url(value)}")
        else:
            redacted.append(redact_url(arg) if "://" in arg else arg)
    return redacted


def read_url_file(path: Path, setting: str = ENV_URL_FILE) -> str:
    """The broker URL held in ``path`` (e.g. a mounted Secret), surrounding whitespace removed.

    Raises:
        ValueError: when the file cannot be read or does not hold exactly one URL. The message names the
            file and the setting, never the file's content.
    """
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ValueError(f"cannot read {setting} ({path}): {reason}") from None
    if not text:
        raise ValueError(f"{setting} ({path}) is empty; it must hold the broker URL")
    if "\n" in text or "://" not in text:
        raise ValueError(f"{setting} ({path}) must hold one broker URL (amqp://... or amqps://...) and nothing else")
    return text


def broker_url(*, url: str | None = None, url_file: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """The broker URL from a flag (``url`` or ``url_file``), else ``AMQP_URL`` or ``AMQP_URL_FILE``, else the default.

    Raises:
        ValueError: when both forms are given at the same level, or the file cannot be used.
    """
    env = os.environ if env is None else env
    if url and url_file:
        raise ValueError("--amqp-url and --amqp-url-file are both given; give one")
    if url:
        return url
    if url_file:
        return read_url_file(url_file, "--amqp-url-file")
    if env.get(ENV_URL) and env.get(ENV_URL_FILE):
        raise ValueError(f"{ENV_URL} and {ENV_URL_FILE} are both set; set one")
    if env.get(ENV_URL_FILE):
        return read_url_file(Path(env[ENV_URL_FILE]))
    return env.get(ENV_URL) or DEFAULT_AMQP_URL


def connect_failure(url: str, error: BaseException) -> str:
    """One sentence saying why connecting to ``url`` failed and what to do, without its credentials.

    Rejected credentials are told apart from an unreachable broker: retrying cannot fix them.
    """
    where = redact_url(url)
    if isinstance(error, aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError):
        user = url.partition("://")[2].rpartition("@")[0].partition(":")[0] or "guest"
        return (
            f"the broker at {where} refused the credentials of user {user!r}; fix the user name or password "
            "in AMQP_URL (or --amqp-url, or the file AMQP_URL_FILE names), or grant that user access to the "
            "virtual host"
        )
    return f"no RabbitMQ answered at {where} ({error}); start the broker (`make broker`) or fix AMQP_URL"
