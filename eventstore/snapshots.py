"""Where session snapshots are kept: a cache of folded state, never the source of truth.

A snapshot lets a session activate from its state as of some log position plus the
events after it, instead of folding its whole log (rule 1: the log stays the truth).
The stores here keep opaque bytes under a session's (tenant, session id); what the
bytes mean, and when they may be trusted, is the session's business
(actors/snapshots.py). Losing one costs a full fold, never data, so a store that
cannot be reached answers "no snapshot" and a write that fails is only logged.

The JetStream store is a key-value bucket (one entry per session, history 1): its
key is the session_key, so two tenants' sessions of one name never share an entry.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import nats.errors
import nats.js.errors
import structlog
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from bus.connection import replicas as configured_replicas
from bus.subjects import SNAPSHOTS_BUCKET, session_key
from eventstore.errors import StoreUnavailable

__all__ = ["InMemorySnapshotStore", "JetStreamSnapshotStore", "SnapshotStore"]

log = structlog.get_logger("veil.snapshots")


class SnapshotStore(Protocol):
    async def get(self, tenant: str, session_id: str) -> bytes | None:
        """The session's snapshot, None if it has none or it cannot be read now."""
        ...

    async def put(self, tenant: str, session_id: str, data: bytes) -> None:
        """Replace the session's snapshot (a failure is logged, not raised)."""
        ...

    async def delete(self, tenant: str, session_id: str) -> None:
        """Forget the session's snapshot so its bytes are gone."""
        ...


class InMemorySnapshotStore:
    """Snapshots in a dict, for tests and single-process runs."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}

    async def get(self, tenant: str, session_id: str) -> bytes | None:
        return self.entries.get(session_key(tenant, session_id))

    async def put(self, tenant: str, session_id: str, data: bytes) -> None:
        self.entries[session_key(tenant, session_id)] = data

    async def delete(self, tenant: str, session_id: str) -> None:
        self.entries.pop(session_key(tenant, session_id), None)


class JetStreamSnapshotStore:
    """Snapshots in the VEIL_SNAPSHOTS key-value bucket."""

    def __init__(self, kv: KeyValue, *, timeout: float = 5.0) -> None:
        self._kv = kv
        self._timeout = timeout

    @classmethod
    async def open(
        cls, js: JetStreamContext, *, replicas: int | None = None
    ) -> JetStreamSnapshotStore:
        try:
            kv = await js.key_value(SNAPSHOTS_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            count = configured_replicas() if replicas is None else replicas
            # Direct gets: the value comes as the message's raw body (a megabyte-sized
            # snapshot read through the API as base64 in JSON took 30-70 ms, not 2-3). A
            # replica that lags may serve an older snapshot, which is still a true prefix.
            kv = await js.create_key_value(
                KeyValueConfig(bucket=SNAPSHOTS_BUCKET, history=1, replicas=count, direct=True)
            )
        return cls(kv)

    async def get(self, tenant: str, session_id: str) -> bytes | None:
        key = session_key(tenant, session_id)
        try:
            async with asyncio.timeout(self._timeout):
                entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except (TimeoutError, nats.errors.Error) as error:
            log.warning("snapshot.unreadable", key=key, error=repr(error))
            return None
        return entry.value or None

    async def put(self, tenant: str, session_id: str, data: bytes) -> None:
        key = session_key(tenant, session_id)
        try:
            async with asyncio.timeout(self._timeout):
                await self._kv.put(key, data)
        except (TimeoutError, nats.errors.Error) as error:
            # Too large for the server's max_payload, or the bus is down: a full fold still works.
            log.warning("snapshot.unwritten", key=key, size=len(data), error=repr(error))

    async def delete(self, tenant: str, session_id: str) -> None:
        # Purge, not delete: a delete marker would leave the old value in the bucket's history.
        # A failure is raised: the deletion's tombstone has the next activation try again.
        try:
            async with asyncio.timeout(self._timeout):
                await self._kv.purge(session_key(tenant, session_id))
        except (TimeoutError, nats.errors.Error) as error:
            raise StoreUnavailable(f"purge on {SNAPSHOTS_BUCKET}: {error!r}") from error
