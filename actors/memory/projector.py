"""From log events to memory records: which messages become memories, owned by whom."""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from nats.aio.msg import Msg

from actors.memory.embedder import Embedder
from actors.memory.index import MemoryIndex, MemoryRecord
from bus.codec import DecodeError
from bus.subjects import session_from_events_subject
from eventstore.events import EventUnion, FactsExtracted, ReplyCompleted, SessionOpened, TurnStarted
from eventstore.store import EventStore
from eventstore.upcast import EVENT_CODEC

__all__ = ["Owner", "Projector", "records_of"]

log = structlog.get_logger("veil.memory")

# (tenant, user_id) of a session, pinned when it opened.
Owner = tuple[str, str | None]

REMEMBERED_ROLES = frozenset({"user", "assistant"})


def records_of(session_id: str, seq: int, event: EventUnion, owner: Owner) -> list[MemoryRecord]:
    """The memories one event adds: user messages when a turn starts, the reply when it completes.

    Record ids are stable (session and log position), so replaying the log
    yields the same records: the projection is idempotent and rebuildable.
    """
    tenant, user_id = owner

    def record(suffix: str, kind: str, role: str, text: str) -> MemoryRecord:
        return MemoryRecord(
            id=f"{session_id}:{seq}{suffix}",
            tenant=tenant,
            user_id=user_id,
            session_id=session_id,
            kind=kind,
            role=role,
            text=text,
            source_seq=seq,
            created_at=event.at,
        )

    match event:
        case TurnStarted():
            return [
                record(f":{i}", "message", m.role, m.content)
                for i, m in enumerate(event.messages)
                if m.role in REMEMBERED_ROLES and m.content.strip()
            ]
        case ReplyCompleted() if event.content.strip():
            return [record("", "message", "assistant", event.content)]
        case FactsExtracted():
            return [
                record(f":f{i}", "fact", "user", fact)
                for i, fact in enumerate(event.facts)
                if fact.strip()
            ]
        case SessionOpened():
            return []
        case _:
            return []


class Projector:
    """Turns batches of stored events into index rows, committed with their log position.

    The live memory actor and `veil reindex` both use it, so a rebuild is the
    same computation as the live build.
    """

    def __init__(self, index: MemoryIndex, embedder: Embedder, store: EventStore) -> None:
        self.index = index
        self._embedder = embedder
        self._store = store
        self._owners: dict[str, Owner] = {}

    def forget(self, session_id: str) -> None:
        """Drop what is cached of a deleted session; the index refuses its records itself."""
        self._owners.pop(session_id, None)

    async def _owner(self, session_id: str, event: EventUnion) -> Owner | None:
        if isinstance(event, SessionOpened):
            self._owners[session_id] = (event.tenant, event.user_id)
        owner = self._owners.get(session_id)
        if owner is None:
            # This session opened before the position we started from: read its opening.
            first = await self._store.load(session_id)
            if first and isinstance(first[0].event, SessionOpened):
                opened = first[0].event
                owner = self._owners[session_id] = (opened.tenant, opened.user_id)
        return owner

    async def apply_messages(self, batch: Sequence[Msg]) -> int:
        """`apply` for messages read from CHAT_EVENTS."""
        return await self.apply([(m.subject, m.metadata.sequence.stream, m.data) for m in batch])

    async def apply(self, batch: list[tuple[str, int, bytes]]) -> int:
        """Index (subject, seq, data) items; returns how many records were added."""
        if not batch:
            return 0
        records: list[MemoryRecord] = []
        for subject, seq, data in batch:
            session_id = session_from_events_subject(subject)
            try:
                event = EVENT_CODEC.decode(data)
            except DecodeError:
                log.warning("memory.undecodable_event", subject=subject, seq=seq)
                continue
            owner = await self._owner(session_id, event)
            if owner is not None:
                records.extend(records_of(session_id, seq, event, owner))
        # Deleted sessions are not worth embedding. The check that counts is the one
        # `add` makes when it stores the batch: a deletion may land while we embed.
        gone = await self.index.forgotten({(r.tenant, r.session_id) for r in records})
        records = [r for r in records if (r.tenant, r.session_id) not in gone]
        vectors = await self._embedder.aembed([r.text for r in records])
        await self.index.add(records, vectors, checkpoint=batch[-1][1])
        return len(records)
