"""Session snapshots: activation from a snapshot is exactly a full fold, and anything
doubtful about a snapshot sends the session back to its whole log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from actors import session, snapshots
from actors.leases import Leases
from actors.session_actor import SessionActor, SessionContext
from actors.session_front import SessionFront
from bus.runtime import Envelope
from bus.signals import Signals
from bus.subjects import SESSION_CANCEL_WILDCARD, session_key
from config import Config
from contracts.conversations import AddItems, OpenConversation
from contracts.session import (
    SESSION_COMMAND_CODEC,
    TURN_REPLY_CODEC,
    DeleteSession,
    GetSession,
)
from eventstore.events import (
    ChatMessage,
    EventUnion,
    HistorySummarized,
    ItemDeleted,
    ItemsAdded,
    MetadataUpdated,
    ReplyCompleted,
    ResponseDeleted,
    SessionOpened,
    TurnCancelled,
    TurnFailed,
    TurnStarted,
    Usage,
)
from eventstore.memory import InMemoryEventStore
from eventstore.snapshots import InMemorySnapshotStore, JetStreamSnapshotStore
from eventstore.store import StoredEvent
from eventstore.tombstones import Tombstone, TombstoneLog

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TENANT, SID = "t", "s1"

# One step of a generated conversation: what happens, and a number that picks its details.
_OPS = st.tuples(
    st.sampled_from(
        ["reply", "reply", "reply", "fail", "cancel", "add", "delete", "forget", "meta", "sum"]
    ),
    st.integers(min_value=0, max_value=40),
)


def _log(ops: list[tuple[str, int]], tenant: str = TENANT) -> list[EventUnion]:
    """A session's log made of turns, failures, cancellations and conversation edits."""
    events: list[EventUnion] = [
        SessionOpened(at=T0, session_id=SID, tenant=tenant, key_id="k", user_id="u")
    ]
    turns: list[str] = []
    items = 0
    for i, (op, n) in enumerate(ops):
        at = T0 + timedelta(seconds=i + 1)
        turn_id = f"turn{i}"
        if op in ("reply", "fail", "cancel"):
            events.append(
                TurnStarted(
                    at=at,
                    turn_id=turn_id,
                    command_id=f"cmd{i}",
                    model="veil",
                    messages=[ChatMessage(role="user", content=f"q{i}")],
                    lease_until=at + timedelta(minutes=1),
                )
            )
            turns.append(turn_id)
        if op == "reply":
            usage = Usage(prompt_tokens=n, completion_tokens=1, total_tokens=n + 1)
            events.append(
                ReplyCompleted(
                    at=at,
                    turn_id=turn_id,
                    content=f"a{i}",
                    finish_reason="stop",
                    usage=usage,
                    call=None,
                )
            )
            items += 2
        elif op == "fail":
            events.append(TurnFailed(at=at, turn_id=turn_id, status=502, code="up", message="x"))
        elif op == "cancel":
            events.append(TurnCancelled(at=at, turn_id=turn_id, content=f"part{i}"))
        elif op == "add":
            added = [ChatMessage(role="user", content=f"m{i}.{j}") for j in range(n % 3 + 1)]
            events.append(ItemsAdded(at=at, messages=added))
            items += len(added)
        elif op == "delete":
            events.append(ItemDeleted(at=at, item=n % (items + 1)))
        elif op == "forget" and turns:
            events.append(ResponseDeleted(at=at, turn_id=turns[n % len(turns)]))
        elif op == "meta":
            events.append(MetadataUpdated(at=at, metadata={"k": str(n)}))
        elif op == "sum":
            state = session.fold(events)
            covers = n % (len(state.history) + 1)
            events.append(HistorySummarized(at=at, turn_id="", summary=f"s{i}", covers=covers))
    return events


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(_OPS, min_size=1, max_size=40), cut=st.floats(min_value=0, max_value=1))
def test_a_snapshot_at_any_point_then_the_rest_folds_to_the_full_fold(
    ops: list[tuple[str, int]], cut: float
) -> None:
    events = _log(ops)
    at = max(1, round(cut * len(events)))
    data = snapshots.encode(TENANT, SID, at, session.fold(events[:at]))
    found = snapshots.decode(data, TENANT, SID)
    assert found is not None and found.seq == at
    assert session.fold(events[at:], found.state) == session.fold(events)


class _CountingStore(InMemoryEventStore):
    """Remembers from where each load read the log."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[int] = []

    async def load(self, tenant: str, session_id: str, after: int = 0) -> list[StoredEvent]:
        self.loads.append(after)
        return await super().load(tenant, session_id, after)


def _ctx(store: InMemoryEventStore, snaps: InMemorySnapshotStore, **more: Any) -> SessionContext:
    # The actor never reaches the bus in these tests: it only reads and writes stores.
    nc: Any = object()
    return SessionContext(
        nc=nc,
        store=store,
        config=Config(),
        signals=Signals(nc, SESSION_CANCEL_WILDCARD),
        leases=Leases(nc),
        snapshots=snaps,
        **more,
    )


async def _stored(store: InMemoryEventStore, events: list[EventUnion]) -> list[int]:
    """Append the events one by one (other sessions' appends in between); their seqs."""
    seqs = []
    for i, event in enumerate(events):
        last = await store.last_seq(TENANT, SID)
        seqs.append(await store.append(TENANT, SID, [event], expected_last_seq=last))
        if i % 7 == 0:  # the store's sequence is shared: seqs of one session have gaps
            other = await store.last_seq(TENANT, "other")
            await store.append(TENANT, "other", [event], expected_last_seq=other)
    return seqs


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(_OPS, min_size=1, max_size=40), cut=st.floats(min_value=0, max_value=1))
async def test_activation_from_a_snapshot_gives_the_state_of_a_full_fold(
    ops: list[tuple[str, int]], cut: float
) -> None:
    store, snaps = _CountingStore(), InMemorySnapshotStore()
    events = _log(ops)
    seqs = await _stored(store, events)
    at = max(1, round(cut * len(events)))
    prefix = snapshots.encode(TENANT, SID, seqs[at - 1], session.fold(events[:at]))
    await snaps.put(TENANT, SID, prefix)
    actor = SessionActor(session_key(TENANT, SID), _ctx(store, snaps))
    await actor._reload()
    assert actor.snapshot() == (session.fold(events), seqs[-1])
    assert store.loads == [seqs[at - 1] - 1], "only the snapshot's last event and after are read"


def _bad_snapshots(events: list[EventUnion], last: int) -> dict[str, bytes]:
    """Snapshots that must not be used, each holding a state that is not this log's fold."""
    wrong = session.fold(events[:1])
    good = snapshots.Snapshot(
        version=snapshots.SNAPSHOT_VERSION, tenant=TENANT, session_id=SID, seq=1, state=wrong
    )
    encode = msgspec.msgpack.encode
    return {
        "undecodable": b"\x93not a snapshot",
        "truncated": encode(good)[:-5],
        "another version": encode(msgspec.structs.replace(good, version="0-old")),
        "past the log's end": encode(msgspec.structs.replace(good, seq=last + 1)),
        # Seq 2 is the other session's (see _stored): a log rebuilt with other numbers.
        "on another session's event": encode(msgspec.structs.replace(good, seq=2)),
        "another tenant's": snapshots.encode("u", SID, 1, session.fold(_log([], "u"))),
        "another session's": snapshots.encode(TENANT, "s2", 1, wrong),
        "a foreign state inside": encode(
            msgspec.structs.replace(good, state=session.fold(_log([], "u")))
        ),
        "no position": encode(msgspec.structs.replace(good, seq=0)),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "undecodable",
        "truncated",
        "another version",
        "past the log's end",
        "on another session's event",
        "another tenant's",
        "another session's",
        "a foreign state inside",
        "no position",
    ],
)
async def test_a_stale_corrupt_or_foreign_snapshot_is_ignored(kind: str) -> None:
    store, snaps = _CountingStore(), InMemorySnapshotStore()
    events = _log([("reply", 1), ("add", 2), ("delete", 1), ("reply", 3)])
    seqs = await _stored(store, events)
    await snaps.put(TENANT, SID, _bad_snapshots(events, seqs[-1])[kind])
    actor = SessionActor(session_key(TENANT, SID), _ctx(store, snaps))
    await actor._reload()
    assert actor.snapshot() == (session.fold(events), seqs[-1])
    assert store.loads[-1] == 0, "the whole log is folded"


async def test_a_read_of_a_session_without_an_actor_starts_from_its_snapshot() -> None:
    store, snaps = _CountingStore(), InMemorySnapshotStore()
    events = _log([("reply", 1), ("add", 2), ("delete", 1), ("reply", 3), ("meta", 4)])
    seqs = await _stored(store, events)
    await snaps.put(TENANT, SID, snapshots.encode(TENANT, SID, seqs[3], session.fold(events[:4])))
    front = SessionFront(_ctx(store, snaps))
    request: Any = _Request()
    request.data = SESSION_COMMAND_CODEC.encode(
        GetSession(session_id=SID, tenant=TENANT, messages=True)
    )
    work = front.screen(session_key(TENANT, SID), request, None)
    assert not isinstance(work, Envelope)
    await work
    view = TURN_REPLY_CODEC.decode(request.replies[-1])
    assert view == session.session_view(SID, session.fold(events), messages=True)
    assert store.loads == [seqs[3] - 1]


def test_a_snapshot_of_one_tenant_never_reads_as_another_tenants() -> None:
    state = session.fold(_log([("reply", 1)], "a"))
    data = snapshots.encode("a", SID, 2, state)
    assert snapshots.decode(data, "a", SID) is not None
    assert snapshots.decode(data, "b", SID) is None
    # Neither by its header nor by the state inside: each is checked on its own.
    assert snapshots.decode(snapshots.encode("a", SID, 2, session.initial()), "b", SID) is None
    assert snapshots.decode(snapshots.encode("b", SID, 2, state), "b", SID) is None


class _Request:
    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.headers: dict[str, str] = {}

    async def respond(self, data: bytes) -> None:
        self.replies.append(data)


def _add(i: int) -> AddItems:
    return AddItems(
        session_id=SID,
        tenant=TENANT,
        key_id="k",
        messages=[ChatMessage(role="user", content=str(i))],
    )


async def _grown(actor: SessionActor, edits: int) -> None:
    """The session opened and grown by `edits` conversation edits, as the front sends them."""
    opened = OpenConversation(session_id=SID, tenant=TENANT, key_id="k")
    await actor.receive(Envelope(_Request(), opened))  # type: ignore[arg-type]
    for i in range(edits):
        await actor.receive(Envelope(_Request(), _add(i)))  # type: ignore[arg-type]
        await actor.stop()  # a snapshot's write, off the mailbox, is done before the next


async def test_the_actor_writes_a_snapshot_every_n_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(snapshots, "SNAPSHOT_EVERY", 4)
    store, snaps = InMemoryEventStore(), InMemorySnapshotStore()
    await _grown(SessionActor(session_key(TENANT, SID), _ctx(store, snaps)), 9)
    stored = await store.load(TENANT, SID)
    found = snapshots.decode(snaps.entries[session_key(TENANT, SID)], TENANT, SID)
    # Ten events (the opening and nine edits): snapshots after the fourth and the eighth.
    assert found is not None and found.seq == stored[7].seq
    covered = [s.event for s in stored if s.seq <= found.seq]
    assert found.state == session.fold(covered)
    again = SessionActor(session_key(TENANT, SID), _ctx(store, snaps))
    await again._reload()
    assert again.snapshot() == (session.fold([s.event for s in stored]), stored[-1].seq)


async def test_deleting_a_session_deletes_its_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshots, "SNAPSHOT_EVERY", 2)
    store, snaps = InMemoryEventStore(), InMemorySnapshotStore()
    actor = SessionActor(session_key(TENANT, SID), _ctx(store, snaps))
    await _grown(actor, 5)
    assert snaps.entries
    delete = DeleteSession(session_id=SID, tenant=TENANT, key_id="k")
    request = _Request()

    async def no_memory(tenant: str) -> int:
        return 0

    monkeypatch.setattr(actor, "_forget_memories", no_memory)
    await actor.receive(Envelope(request, delete))  # type: ignore[arg-type]
    assert request.replies and not snaps.entries
    assert await store.load(TENANT, SID) == []


async def test_a_deletion_cut_short_removes_the_snapshot_on_the_next_activation(
    nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshots, "SNAPSHOT_EVERY", 2)
    js = nc.jetstream()
    tombstones = TombstoneLog(js, nc)
    await tombstones.ensure()
    store, snaps = InMemoryEventStore(), InMemorySnapshotStore()
    await _grown(SessionActor(session_key(TENANT, SID), _ctx(store, snaps)), 5)
    assert snaps.entries
    # The deletion stopped right after its tombstone.
    await tombstones.record(Tombstone(session_id=SID, tenant=TENANT, deleted_by="k", at=T0))
    actor = SessionActor(session_key(TENANT, SID), _ctx(store, snaps, tombstones=tombstones))
    await actor._reload()
    assert not snaps.entries and await store.load(TENANT, SID) == []
    assert not actor.owned_by(TENANT)


async def test_the_jetstream_bucket_keeps_one_snapshot_per_tenant_and_session(
    nc: Client,
) -> None:
    store = await JetStreamSnapshotStore.open(nc.jetstream(), replicas=1)
    await store.put("a", SID, b"of a")
    await store.put("b", SID, b"of b")
    await store.put("a", SID, b"of a, later")
    assert await store.get("a", SID) == b"of a, later"
    assert await store.get("b", SID) == b"of b"
    assert await store.get("c", SID) is None
    await store.delete("a", SID)
    await store.delete("a", "never-written")
    assert await store.get("a", SID) is None
    assert await store.get("b", SID) == b"of b"
