"""Broker URLs as people may see them: never with their credentials."""

from __future__ import annotations

import aiormq.exceptions

__all__ = ["connect_failure", "redact_url"]


def redact_url(url: str) -> str:
    """``url`` with its user information replaced by ``***``, for logs, errors and reports.

    The user information ends at the *last* ``@`` of the URL, so a password that holds an unescaped
    ``@`` is hidden too (erring towards hiding part of a path rather than any of a password).
    """
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return scheme + sep + rest


def connect_failure(url: str, error: BaseException) -> str:
    """One sentence saying why connecting to ``url`` failed and what to do, without its credentials.

    Rejected credentials are told apart from an unreachable broker: retrying cannot fix them.
    """
    where = redact_url(url)
    if isinstance(error, aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError):
        user = url.partition("://")[2].rpartition("@")[0].partition(":")[0] or "guest"
        return (
            f"the broker at {where} refused the credentials of user {user!r}; fix the user name or password "
            "in AMQP_URL (or --amqp-url), or grant that user access to the virtual host"
        )
    return f"no RabbitMQ answered at {where} ({error}); start the broker (`make broker`) or fix AMQP_URL"
