"""The EventStore protocol that every store implements.

A session's log is found by its tenant and its id together (bus/subjects.py): two
tenants may use the same session id and never share a log.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, Self

import msgspec

from eventstore.events import EventUnion

__all__ = ["Appended", "EventStore", "SessionInfo", "StoredEvent"]


class StoredEvent(msgspec.Struct, frozen=True, kw_only=True):
    # Position in the store: the stream sequence for JetStream. Strictly
    # increasing within a session, not contiguous.
    seq: int
    event: EventUnion


class Appended(int):
    """What an append returns: the seq of the batch's last event, and how many of the
    batch's first events an earlier try of it (same dedupe_id) had already stored.

    Those stay in the log as that try made them: a command decided again carries its own
    clock, so a caller that folds what it appended reads them back when `reused` is set.
    An int, so that every caller that only wants the seq keeps it as before; msgspec
    encodes plain ints only (`int(appended)` where it is stored).
    """

    reused: int

    def __new__(cls, seq: int, reused: int = 0) -> Self:
        appended = super().__new__(cls, seq)
        appended.reused = reused
        return appended


class SessionInfo(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    session_id: str
    events: int
    last_seq: int


class EventStore(Protocol):
    async def load(self, tenant: str, session_id: str, after: int = 0) -> list[StoredEvent]:
        """Events of one session with seq > after, in order."""
        ...

    async def append(
        self,
        tenant: str,
        session_id: str,
        events: Sequence[EventUnion],
        *,
        expected_last_seq: int,
        dedupe_id: str | None = None,
    ) -> Appended:
        """Append events in order if the session's last seq is expected_last_seq.

        expected_last_seq is 0 for a session with no events. Returns the seq of
        the last appended event. Raises ConcurrencyConflict when another writer
        got there first. With dedupe_id, re-appending the same batch (a retry
        after a lost acknowledgement) stores nothing twice: what an earlier try
        stored is kept, and counted in the result's `reused`.
        """
        ...

    async def first(self, tenant: str, session_id: str) -> StoredEvent | None:
        """The session's first event (it says who owns the session), None if it has none."""
        ...

    async def last_seq(self, tenant: str, session_id: str) -> int:
        """The seq of the session's last event, 0 if it has none."""
        ...

    async def sessions(self) -> list[SessionInfo]:
        """Every session with at least one event."""
        ...

    async def erase(self, tenant: str, session_id: str) -> int:
        """Delete every event of a session so its bytes are gone; returns how many."""
        ...

    async def subject(self, tenant: str, session_id: str) -> str:
        """The bus subject the session's appends are published on (to wait for one)."""
        ...

    async def legacy_tenant(self, session_id: str) -> str | None:
        """The tenant of a session stored before sessions were per tenant, under its id
        alone (`chat.events.<id>`); None if no such session exists."""
        ...
