"""An in-memory EventStore for tests and single-process runs."""

from __future__ import annotations

from collections.abc import Sequence

from bus.subjects import validate_id
from eventstore.errors import ConcurrencyConflict
from eventstore.events import EventUnion
from eventstore.store import SessionInfo, StoredEvent

__all__ = ["InMemoryEventStore"]


class InMemoryEventStore:
    """Behaves like the JetStream store: one global sequence shared by all sessions."""

    def __init__(self) -> None:
        self._seq = 0
        self._logs: dict[str, list[StoredEvent]] = {}
        # (session, dedupe_id) -> last seq of the batch that was stored under it.
        self._dedupe: dict[tuple[str, str], int] = {}

    async def load(self, session_id: str, after: int = 0) -> list[StoredEvent]:
        """Events of one session with seq > after, in order."""
        log = self._logs.get(validate_id(session_id, "session id"), [])
        return [stored for stored in log if stored.seq > after]

    async def append(
        self,
        session_id: str,
        events: Sequence[EventUnion],
        *,
        expected_last_seq: int,
        dedupe_id: str | None = None,
    ) -> int:
        """Append events if the session is still at expected_last_seq."""
        validate_id(session_id, "session id")
        # No await in here: the check and the write cannot interleave with another append.
        if dedupe_id is not None and (session_id, dedupe_id) in self._dedupe:
            # A retry of a batch that was stored: like JetStream, it wins over the expected seq.
            return self._dedupe[(session_id, dedupe_id)]
        last = self._last(session_id)
        if last != expected_last_seq:
            raise ConcurrencyConflict(session_id, expected_last_seq)
        if not events:
            return last
        log = self._logs.setdefault(session_id, [])
        for event in events:
            self._seq += 1
            log.append(StoredEvent(seq=self._seq, event=event))
        if dedupe_id is not None:
            self._dedupe[(session_id, dedupe_id)] = self._seq
        return self._seq

    async def first(self, session_id: str) -> StoredEvent | None:
        """The session's first event, None if it has none."""
        log = self._logs.get(validate_id(session_id, "session id"))
        return log[0] if log else None

    async def last_seq(self, session_id: str) -> int:
        """The seq of the session's last event, 0 if it has none."""
        return self._last(validate_id(session_id, "session id"))

    async def sessions(self) -> list[SessionInfo]:
        """Every session with at least one event, sorted by id."""
        return [
            SessionInfo(session_id=sid, events=len(log), last_seq=log[-1].seq)
            for sid, log in sorted(self._logs.items())
            if log
        ]

    async def erase(self, session_id: str) -> int:
        """Forget a session's events and its dedupe ids."""
        log = self._logs.pop(validate_id(session_id, "session id"), [])
        for key in [k for k in self._dedupe if k[0] == session_id]:
            del self._dedupe[key]
        return len(log)

    def _last(self, session_id: str) -> int:
        log = self._logs.get(session_id)
        return log[-1].seq if log else 0
