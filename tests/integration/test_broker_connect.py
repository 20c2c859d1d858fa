"""Connecting to the real broker: rejected credentials stop at once and say so."""

from __future__ import annotations

import pytest

from worker.broker import connect
from worker.errors import BrokerAuthenticationError

pytestmark = pytest.mark.integration


async def test_rejected_credentials_stop_at_once_with_a_message_naming_them(amqp_url: str) -> None:
    scheme, _, rest = amqp_url.partition("://")
    wrong = f"{scheme}://guest:Zq9w@xK7v@{rest.rpartition('@')[2]}"
    with pytest.raises(BrokerAuthenticationError) as raised:
        # A minute of retries would still be running if the rejection were taken for an outage.
        await connect(wrong, timeout_s=60, name="qinfer-test-wrong-password")
    text = str(raised.value)
    assert "refused the credentials of user 'guest'" in text
    assert "Zq9w" not in text
    assert "xK7v" not in text
