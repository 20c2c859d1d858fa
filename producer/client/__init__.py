"""The RPC client: :class:`Client` (async) and :class:`SyncClient`, with call packing in :mod:`.coalesce`."""

from producer.client.rpc import Client, SyncClient

__all__ = ["Client", "SyncClient"]
