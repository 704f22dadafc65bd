"""From log events to memory records: which messages become memories, owned by whom.

Items. A turn is remembered as one item when it ends: its user's messages (from its
turn.started) and the reply, together, so the reply "Wow, tell me more" carries
what it answers and a question finds the answer where the user's words are
(bench/long_memory_eval.py: recall@10 0.66 with one item a message, 0.76 with a
turn as one item at the same fusion, 0.80 with the fusion retuned for it; the live
projection and the benchmark's own exchange items score the same). A failed or
cancelled turn keeps its user's messages alone. An item holds at most
`actors.memory.items.ITEM_TOKENS` (150): a longer turn is cut
into consecutive parts, so ten recalled items never pass 1,500 tokens (issue 15)
and the embedder (256 word pieces) reads each part whole.

Ids are the position of the event that ended the turn (`session:seq`, then
`session:seq:p1`, ... for further parts), so a rebuild from the log (`veil
reindex`) makes the same records as the live projection; the projector keeps
each open turn's turn.started until its end, and reads it from the session's
log when it started from a position after it (a restart).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import structlog
from nats.aio.msg import Msg

from actors.memory.embedder import Embedder
from actors.memory.index import MemoryIndex, MemoryRecord
from actors.memory.items import exchange, parts, started_of
from bus.codec import DecodeError
from bus.subjects import session_from_events_subject
from eventstore.events import (
    EventUnion,
    FactsExtracted,
    ReplyCompleted,
    SessionOpened,
    TurnCancelled,
    TurnFailed,
    TurnStarted,
)
from eventstore.store import EventStore
from eventstore.upcast import EVENT_CODEC

__all__ = ["MAX_OWNERS", "Owner", "Projector", "records_of"]

log = structlog.get_logger("veil.memory")

# Sessions whose owner is kept (as the usage ledger keeps 10,000): without a bound the
# memory process grew by one entry for every session ever seen.
MAX_OWNERS = 10_000

# (tenant, user_id) of a session, pinned when it opened.
Owner = tuple[str, str | None]


def records_of(
    session_id: str,
    seq: int,
    event: EventUnion,
    owner: Owner,
    started: TurnStarted | None = None,
) -> list[MemoryRecord]:
    """The memories one event adds: a turn when it ends (`started` is its turn.started),
    facts when they are extracted.

    Record ids are stable (session and log position), so replaying the log
    yields the same records: the projection is idempotent and rebuildable.
    """
    tenant, user_id = owner

    def record(id_: str, kind: str, role: str, text: str) -> MemoryRecord:
        return MemoryRecord(
            id=id_,
            tenant=tenant,
            user_id=user_id,
            session_id=session_id,
            kind=kind,
            role=role,
            text=text,
            source_seq=seq,
            created_at=started.at if started is not None else event.at,
        )

    match event:
        case ReplyCompleted() | TurnFailed() | TurnCancelled():
            asked = started.messages if started is not None else []
            reply = event.content if isinstance(event, ReplyCompleted) else ""
            users = any(m.role == "user" and m.content.strip() for m in asked)
            role = "user" if users else "assistant"
            return [
                record(f"{session_id}:{seq}" + (f":p{n}" if n else ""), "exchange", role, text)
                for n, text in enumerate(parts(exchange(asked, reply)))
            ]
        case FactsExtracted():
            return [
                record(f"{session_id}:{seq}:f{i}", "fact", "user", fact)
                for i, fact in enumerate(event.facts)
                if fact.strip()
            ]
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
        # By (tenant, session id): two tenants may use the same session id. The recent
        # ones only: another session's owner is one read of its log's first event.
        self._owners: OrderedDict[tuple[str, str], Owner] = OrderedDict()
        # The turn.started of each session's open turns, by turn id, until the turn ends.
        self._open: dict[tuple[str, str], dict[str, TurnStarted]] = {}

    def forget(self, tenant: str, session_id: str) -> None:
        """Drop what is cached of a deleted session; the index refuses its records itself."""
        self._owners.pop((tenant, session_id), None)
        self._open.pop((tenant, session_id), None)

    async def _started(self, tenant: str, session_id: str, event: EventUnion) -> TurnStarted | None:
        """Keep a turn.started until its turn ends; at the end, hand it over."""
        key = (tenant, session_id)
        match event:
            case TurnStarted():
                self._open.setdefault(key, {})[event.turn_id] = event
                return None
            case ReplyCompleted() | TurnFailed() | TurnCancelled():
                turns = self._open.get(key, {})
                started = turns.pop(event.turn_id, None)
                if not turns:
                    self._open.pop(key, None)
                if started is None:
                    # The turn started before the position we started from: read its log.
                    stored = await self._store.load(tenant, session_id)
                    started = started_of((s.event for s in stored), event.turn_id)
                return started
            case _:
                return None

    async def _owner(self, tenant: str | None, session_id: str, event: EventUnion) -> Owner | None:
        """Whose memories the session's events make: its tenant, and the user it opened for."""
        if tenant is None:
            # A log written before sessions were per tenant: the store knows whose it is.
            tenant = await self._store.legacy_tenant(session_id)
            if tenant is None:
                return None
        key = (tenant, session_id)
        if isinstance(event, SessionOpened):
            self._remember(key, (tenant, event.user_id))
        owner = self._owners.get(key)
        if owner is None:
            # This session opened before the position we started from (or is no longer
            # among the recent ones): read its opening.
            first = await self._store.first(tenant, session_id)
            if first is not None and isinstance(first.event, SessionOpened):
                owner = (tenant, first.event.user_id)
                self._remember(key, owner)
        else:
            self._owners.move_to_end(key)
        return owner

    def _remember(self, key: tuple[str, str], owner: Owner) -> None:
        self._owners[key] = owner
        self._owners.move_to_end(key)
        while len(self._owners) > MAX_OWNERS:
            self._owners.popitem(last=False)

    async def apply_messages(self, batch: Sequence[Msg]) -> int:
        """`apply` for messages read from CHAT_EVENTS."""
        return await self.apply([(m.subject, m.metadata.sequence.stream, m.data) for m in batch])

    async def apply(self, batch: list[tuple[str, int, bytes]]) -> int:
        """Index (subject, seq, data) items; returns how many records were added."""
        if not batch:
            return 0
        records: list[MemoryRecord] = []
        for subject, seq, data in batch:
            where = session_from_events_subject(subject)
            if where is None:
                log.warning("memory.unknown_subject", subject=subject, seq=seq)
                continue
            tenant, session_id = where
            try:
                event = EVENT_CODEC.decode(data)
            except DecodeError:
                log.warning("memory.undecodable_event", subject=subject, seq=seq)
                continue
            owner = await self._owner(tenant, session_id, event)
            if owner is not None:
                started = await self._started(owner[0], session_id, event)
                records.extend(records_of(session_id, seq, event, owner, started))
        # Deleted sessions are not worth embedding. The check that counts is the one
        # `add` makes when it stores the batch: a deletion may land while we embed.
        gone = await self.index.forgotten({(r.tenant, r.session_id) for r in records})
        records = [r for r in records if (r.tenant, r.session_id) not in gone]
        vectors = await self._embedder.aembed([r.text for r in records])
        await self.index.add(records, vectors, checkpoint=batch[-1][1])
        return len(records)
