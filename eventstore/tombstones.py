"""Tombstones: the only trace a deleted session leaves (that, when, and by whom).

They live in their own stream, so erasing a session's events never touches
them, and projections read them to refuse late events of a deleted session. A
tombstone's subject names the tenant and the session, as the session's log did;
one recorded before sessions were per tenant (under the session id alone) still
counts, for its own tenant only.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext

from bus.codec import Codec
from bus.connection import replicas as configured_replicas
from bus.requests import nats_request
from bus.subjects import (
    TOMBSTONES_STREAM,
    TOMBSTONES_WILDCARD,
    direct_get,
    legacy_session_tombstone,
    session_tombstone,
)
from eventstore.errors import StoreUnavailable
from eventstore.jetstream import create_stream

__all__ = ["Tombstone", "TombstoneLog"]


class Tombstone(msgspec.Struct, frozen=True, kw_only=True, tag="session.deleted", tag_field="type"):
    session_id: str
    tenant: str
    # The key id (never the key) of who asked for the deletion.
    deleted_by: str
    at: datetime


_CODEC: Codec[Tombstone] = Codec(Tombstone)


class TombstoneLog:
    def __init__(self, js: JetStreamContext, nc: Client, *, timeout: float = 5.0) -> None:
        self._js = js
        self._nc = nc
        self._timeout = timeout

    async def ensure(self, *, replicas: int | None = None) -> None:
        config = StreamConfig(
            name=TOMBSTONES_STREAM,
            subjects=[TOMBSTONES_WILDCARD],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=configured_replicas() if replicas is None else replicas,
            allow_direct=True,
        )
        await create_stream(self._js, config)

    async def record(self, tombstone: Tombstone) -> None:
        try:
            await self._js.publish(
                session_tombstone(tombstone.tenant, tombstone.session_id),
                _CODEC.encode(tombstone),
                timeout=self._timeout,
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
            raise StoreUnavailable(f"recording tombstone: {e!r}") from e

    async def get(self, tenant: str, session_id: str) -> Tombstone | None:
        """The session's tombstone, if it was deleted. Both places are read every time,
        so another tenant's old tombstone of the same id costs what no tombstone does."""
        found, legacy = await asyncio.gather(
            self._last(session_tombstone(tenant, session_id)),
            self._last(legacy_session_tombstone(session_id)),
        )
        if found is None and legacy is not None and legacy.tenant == tenant:
            return legacy
        return found

    async def _last(self, subject: str) -> Tombstone | None:
        request = json.dumps({"last_by_subj": subject}).encode()
        try:
            reply = await nats_request(
                self._nc, direct_get(TOMBSTONES_STREAM), request, timeout=self._timeout
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
            raise StoreUnavailable(f"reading tombstone: {e!r}") from e
        if reply.headers and reply.headers.get("Status"):
            return None
        return _CODEC.decode(reply.data)

    async def all(self) -> list[Tombstone]:
        """Every tombstone, oldest first (read once when a projection starts)."""
        try:
            info = await self._js.stream_info(TOMBSTONES_STREAM)
        except nats.js.errors.NotFoundError:
            return []
        out: list[Tombstone] = []
        seq = info.state.first_seq
        while seq and seq <= info.state.last_seq:
            try:
                msg = await self._js.get_msg(
                    TOMBSTONES_STREAM, seq, next=True, subject=TOMBSTONES_WILDCARD, direct=True
                )
            except nats.js.errors.NotFoundError:
                break
            assert msg.data is not None and msg.seq is not None
            out.append(_CODEC.decode(msg.data))
            seq = msg.seq + 1
        return out
