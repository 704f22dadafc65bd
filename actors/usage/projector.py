"""From batches of CHAT_EVENTS messages to ledger rows, committed with their position.

The live usage actor and `veil usage --rebuild` both use it, so a rebuild is the same
computation as the live build. A session first met mid-log (the projection resumed
after a restart) has its earlier events read from its own log, for context only.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from nats.aio.msg import Msg

from actors.usage.ledger import Delta, Ledger, Prices
from actors.usage.store import UsageStore
from bus.codec import DecodeError
from bus.subjects import session_from_events_subject, session_key
from config.schema import Config
from eventstore.events import EventUnion, SessionOpened
from eventstore.store import EventStore
from eventstore.upcast import EVENT_CODEC

__all__ = ["UsageProjector", "prices_of"]

log = structlog.get_logger("veil.usage")


def prices_of(config: Config) -> Prices:
    return Prices({name: (p.prompt, p.completion) for name, p in config.prices.items()})


class UsageProjector:
    def __init__(self, store: UsageStore, events: EventStore, prices: Prices) -> None:
        self.store = store
        self._events = events
        self._ledger = Ledger(prices)

    async def apply_messages(self, batch: Sequence[Msg]) -> int:
        """`apply` for messages read from CHAT_EVENTS."""
        return await self.apply([(m.subject, m.metadata.sequence.stream, m.data) for m in batch])

    async def apply(self, batch: Sequence[tuple[str, int, bytes]]) -> int:
        """Count (subject, seq, data) items; how many deltas were added (0 for a batch the
        ledger already holds)."""
        if not batch:
            return 0
        applied = await self.store.checkpoint()
        deltas: list[Delta] = []
        for subject, seq, data in batch:
            if seq <= applied:
                continue  # replayed: already counted
            where = await self._session_of(subject)
            if where is None:
                log.warning("usage.unknown_session", subject=subject, seq=seq)
                continue
            try:
                event = EVENT_CODEC.decode(data)
            except DecodeError:
                log.warning("usage.undecodable_event", subject=subject, seq=seq)
                continue
            # The ledger knows sessions by tenant and id: two tenants may share an id.
            key = session_key(*where)
            if not isinstance(event, SessionOpened) and not self._ledger.knows(key):
                await self._catch_up(*where, seq)
            deltas.extend(self._ledger.apply(key, event))
        if not await self.store.add(deltas, checkpoint=batch[-1][1]):
            return 0
        return len(deltas)

    async def _session_of(self, subject: str) -> tuple[str, str] | None:
        """(tenant, session id) of a CHAT_EVENTS subject, a legacy one's tenant from the store."""
        where = session_from_events_subject(subject)
        if where is None:
            return None
        tenant, session_id = where
        if tenant is None:
            tenant = await self._events.legacy_tenant(session_id)
        return None if tenant is None else (tenant, session_id)

    async def _catch_up(self, tenant: str, session_id: str, seq: int) -> None:
        """Learn the session's events before `seq` (its owner, its turns so far)."""
        earlier: list[EventUnion] = [
            stored.event
            for stored in await self._events.load(tenant, session_id)
            if stored.seq < seq
        ]
        self._ledger.learn(session_key(tenant, session_id), earlier)
