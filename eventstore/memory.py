"""An in-memory EventStore for tests and single-process runs."""

from __future__ import annotations

from collections.abc import Sequence

from bus.subjects import session_events, session_key
from eventstore.errors import ConcurrencyConflict
from eventstore.events import EventUnion
from eventstore.store import Appended, SessionInfo, StoredEvent

__all__ = ["InMemoryEventStore"]

# A session's identity: (tenant, session id).
_Key = tuple[str, str]


def _key(tenant: str, session_id: str) -> _Key:
    session_key(tenant, session_id)  # validates both, as the JetStream store's subjects do
    return tenant, session_id


class InMemoryEventStore:
    """Behaves like the JetStream store: one global sequence shared by all sessions."""

    def __init__(self) -> None:
        self._seq = 0
        self._logs: dict[_Key, list[StoredEvent]] = {}
        # (session, dedupe_id) -> last seq of the batch that was stored under it.
        self._dedupe: dict[tuple[_Key, str], int] = {}

    async def load(self, tenant: str, session_id: str, after: int = 0) -> list[StoredEvent]:
        """Events of one session with seq > after, in order."""
        log = self._logs.get(_key(tenant, session_id), [])
        return [stored for stored in log if stored.seq > after]

    async def append(
        self,
        tenant: str,
        session_id: str,
        events: Sequence[EventUnion],
        *,
        expected_last_seq: int,
        dedupe_id: str | None = None,
    ) -> Appended:
        """Append events if the session is still at expected_last_seq."""
        key = _key(tenant, session_id)
        # No await in here: the check and the write cannot interleave with another append.
        if dedupe_id is not None and (key, dedupe_id) in self._dedupe:
            # A retry of a batch that was stored: like JetStream, it wins over the expected seq.
            return Appended(self._dedupe[(key, dedupe_id)], reused=len(events))
        last = self._last(key)
        if last != expected_last_seq:
            raise ConcurrencyConflict(session_id, expected_last_seq)
        if not events:
            return Appended(last)
        log = self._logs.setdefault(key, [])
        for event in events:
            self._seq += 1
            log.append(StoredEvent(seq=self._seq, event=event))
        if dedupe_id is not None:
            self._dedupe[(key, dedupe_id)] = self._seq
        return Appended(self._seq)

    async def first(self, tenant: str, session_id: str) -> StoredEvent | None:
        """The session's first event, None if it has none."""
        log = self._logs.get(_key(tenant, session_id))
        return log[0] if log else None

    async def last_seq(self, tenant: str, session_id: str) -> int:
        """The seq of the session's last event, 0 if it has none."""
        return self._last(_key(tenant, session_id))

    async def sessions(self) -> list[SessionInfo]:
        """Every session with at least one event, sorted by tenant and id."""
        return [
            SessionInfo(tenant=tenant, session_id=sid, events=len(log), last_seq=log[-1].seq)
            for (tenant, sid), log in sorted(self._logs.items())
            if log
        ]

    async def erase(self, tenant: str, session_id: str) -> int:
        """Forget a session's events and its dedupe ids."""
        key = _key(tenant, session_id)
        log = self._logs.pop(key, [])
        for gone in [k for k in self._dedupe if k[0] == key]:
            del self._dedupe[gone]
        return len(log)

    async def subject(self, tenant: str, session_id: str) -> str:
        """The subject JetStream would use (nothing is published there by this store)."""
        return session_events(tenant, session_id)

    async def legacy_tenant(self, session_id: str) -> str | None:
        """None: this store never held a log of the layout before sessions were per tenant."""
        return None

    def _last(self, key: _Key) -> int:
        log = self._logs.get(key)
        return log[-1].seq if log else 0
