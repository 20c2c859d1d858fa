"""The RPC client: :class:`Client` (async) and :class:`SyncClient`, with call packing in :mod:`.coalesce`."""

from producer.client.rpc import Client
from producer.client.sync import SyncClient

__all__ = ["Client", "SyncClient"]
