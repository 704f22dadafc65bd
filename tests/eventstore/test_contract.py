"""One contract for every EventStore: the same tests run against each store."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.codec import encode
from bus.subjects import (
    EVENTS_STREAM,
    InvalidToken,
    legacy_session_events,
    legacy_session_tombstone,
    session_events,
)
from eventstore.errors import ConcurrencyConflict, EventStoreError, StoreUnavailable
from eventstore.events import (
    ChatMessage,
    EventUnion,
    ModelCall,
    ModelCalled,
    ReplyCompleted,
    SessionOpened,
    TurnCancelled,
    TurnFailed,
    TurnStarted,
    Usage,
    model_calls,
)
from eventstore.jetstream import EVENT_TYPE_HEADER, JetStreamEventStore, _header, ensure_stream
from eventstore.memory import InMemoryEventStore
from eventstore.store import EventStore, SessionInfo
from eventstore.tombstones import Tombstone, TombstoneLog
from eventstore.upcast import EVENT_CODEC

CODEC = EVENT_CODEC
# The tenant of the sessions these tests write (a session is named within its tenant).
T = "acme"
T0 = datetime(2026, 11, 26, 9, 30, 15, 123456, tzinfo=UTC)


@dataclass
class Harness:
    """A store plus a way to write a raw JSON event behind its back."""

    store: EventStore
    write_raw: Callable[[str, bytes], Awaitable[None]]


@pytest.fixture(params=["memory", "jetstream", "jetstream-batch3"])
async def harness(request: pytest.FixtureRequest, nats_url: str) -> AsyncIterator[Harness]:
    if request.param == "memory":
        memory = InMemoryEventStore()

        async def write_memory(session_id: str, raw: bytes) -> None:
            last = await memory.last_seq(T, session_id)
            await memory.append(T, session_id, [CODEC.decode(raw)], expected_last_seq=last)

        yield Harness(memory, write_memory)
        return
    client = await nats.connect(nats_url)
    js = client.jetstream()
    await ensure_stream(js)
    # A batch of 3 makes every multi-event load page through several requests.
    batch = 3 if request.param == "jetstream-batch3" else 512
    store = JetStreamEventStore(js, client, load_batch=batch)

    async def write_jetstream(session_id: str, raw: bytes) -> None:
        await js.publish(session_events(T, session_id), raw, stream=EVENTS_STREAM)

    yield Harness(store, write_jetstream)
    await client.drain()


@pytest.fixture
def store(harness: Harness) -> EventStore:
    return harness.store


def new_sid() -> str:
    return uuid.uuid4().hex


def make_events(n: int, turn: str = "t1") -> list[EventUnion]:
    """n varied events, each distinguishable from the others."""
    kinds: list[Callable[[int], EventUnion]] = [
        lambda i: TurnStarted(
            at=T0 + timedelta(seconds=i),
            turn_id=f"{turn}-{i}",
            command_id=f"c{i}",
            model="small",
            messages=[ChatMessage(role="user", content=f"hello {i}")],
            params={"temperature": 0.5},
            lease_until=T0 + timedelta(seconds=i + 30),
        ),
        lambda i: ModelCalled(
            at=T0 + timedelta(seconds=i),
            turn_id=f"{turn}-{i}",
            call=ModelCall(
                engine="local",
                upstream_model="smol",
                latency_ms=12.5 + i,
                usage=Usage(prompt_tokens=i, completion_tokens=2, total_tokens=i + 2),
            ),
        ),
        lambda i: ReplyCompleted(
            at=T0 + timedelta(seconds=i),
            turn_id=f"{turn}-{i}",
            content=f"reply {i} é ✓",
            finish_reason="stop",
            usage=Usage(total_tokens=i),
            call=ModelCall(engine="local", upstream_model="smol", latency_ms=3.0 + i),
        ),
        lambda i: TurnFailed(
            at=T0 + timedelta(seconds=i), turn_id=f"{turn}-{i}", status=502, code="x", message="m"
        ),
        lambda i: TurnCancelled(at=T0 + timedelta(seconds=i), turn_id=f"{turn}-{i}"),
    ]
    return [kinds[i % len(kinds)](i) for i in range(n)]


def opened(sid: str, tenant: str = T) -> SessionOpened:
    return SessionOpened(at=T0, session_id=sid, tenant=tenant, key_id="k1")


async def test_empty_session(store: EventStore) -> None:
    sid = new_sid()
    assert await store.load(T, sid) == []
    assert await store.last_seq(T, sid) == 0
    assert sid not in {s.session_id for s in await store.sessions()}


async def test_append_then_load_in_order(store: EventStore) -> None:
    sid = new_sid()
    events: list[EventUnion] = [opened(sid), *make_events(9)]
    last = await store.append(T, sid, events, expected_last_seq=0)
    loaded = await store.load(T, sid)
    assert [s.event for s in loaded] == events
    seqs = [s.seq for s in loaded]
    assert seqs == sorted(set(seqs)) and seqs[0] > 0
    assert last == seqs[-1] == await store.last_seq(T, sid)


async def test_appends_chain_on_the_returned_seq(store: EventStore) -> None:
    sid = new_sid()
    first = await store.append(T, sid, make_events(2), expected_last_seq=0)
    second = await store.append(T, sid, make_events(3, "t2"), expected_last_seq=first)
    loaded = await store.load(T, sid)
    assert len(loaded) == 5
    assert loaded[1].seq == first and loaded[-1].seq == second > first


async def test_load_after(store: EventStore) -> None:
    sid = new_sid()
    events = make_events(8)
    await store.append(T, sid, events, expected_last_seq=0)
    loaded = await store.load(T, sid)
    middle = loaded[4].seq
    later = await store.load(T, sid, after=middle)
    assert [s.event for s in later] == events[5:]
    assert [s.seq for s in later] == [s.seq for s in loaded[5:]]
    assert await store.load(T, sid, after=loaded[-1].seq) == []
    # `after` need not be one of the session's own seqs.
    assert await store.load(T, sid, after=loaded[0].seq - 1) == loaded


async def test_wrong_expected_seq_conflicts_and_stores_nothing(store: EventStore) -> None:
    sid = new_sid()
    last = await store.append(T, sid, make_events(2), expected_last_seq=0)
    for stale in (0, last - 1, last + 1000):
        with pytest.raises(ConcurrencyConflict) as info:
            await store.append(T, sid, make_events(3, "late"), expected_last_seq=stale)
        assert info.value.session_id == sid and info.value.expected == stale
    assert len(await store.load(T, sid)) == 2
    assert await store.last_seq(T, sid) == last


async def test_new_session_must_expect_zero(store: EventStore) -> None:
    other = new_sid()
    elsewhere = await store.append(T, other, make_events(1), expected_last_seq=0)
    sid = new_sid()
    with pytest.raises(ConcurrencyConflict):
        await store.append(T, sid, make_events(1), expected_last_seq=elsewhere)
    assert await store.load(T, sid) == []


async def test_concurrent_appenders_one_wins(store: EventStore) -> None:
    sid = new_sid()
    base = await store.append(T, sid, [opened(sid)], expected_last_seq=0)
    batches = [make_events(3, "a"), make_events(3, "b")]
    results = await asyncio.gather(
        *(store.append(T, sid, b, expected_last_seq=base) for b in batches), return_exceptions=True
    )
    wins = [r for r in results if isinstance(r, int)]
    losses = [r for r in results if isinstance(r, ConcurrencyConflict)]
    assert len(wins) == 1 and len(losses) == 1, results
    winner = batches[results.index(wins[0])]
    loaded = await store.load(T, sid)
    assert [s.event for s in loaded] == [opened(sid), *winner]
    assert loaded[-1].seq == wins[0]


async def test_dedupe_retry_stores_nothing_twice(store: EventStore) -> None:
    sid = new_sid()
    events = make_events(3)
    first = await store.append(T, sid, events, expected_last_seq=0, dedupe_id="cmd-1")
    # The acknowledgement was lost: the writer retries exactly the same call.
    again = await store.append(T, sid, events, expected_last_seq=0, dedupe_id="cmd-1")
    assert again == first
    assert (first.reused, again.reused) == (0, 3), "the retry says the log kept the first try's"
    loaded = await store.load(T, sid)
    assert [s.event for s in loaded] == events
    assert await store.last_seq(T, sid) == first


async def test_dedupe_retry_after_the_session_moved_on(store: EventStore) -> None:
    sid = new_sid()
    events = make_events(2)
    first = await store.append(T, sid, events, expected_last_seq=0, dedupe_id="cmd-1")
    later = await store.append(T, sid, make_events(1, "t2"), expected_last_seq=first)
    assert await store.append(T, sid, events, expected_last_seq=0, dedupe_id="cmd-1") == first
    assert len(await store.load(T, sid)) == 3
    assert await store.last_seq(T, sid) == later


async def test_fresh_dedupe_id_still_checks_expected_seq(store: EventStore) -> None:
    sid = new_sid()
    last = await store.append(T, sid, make_events(2), expected_last_seq=0, dedupe_id="cmd-1")
    with pytest.raises(ConcurrencyConflict):
        await store.append(T, sid, make_events(1, "x"), expected_last_seq=0, dedupe_id="cmd-2")
    assert await store.last_seq(T, sid) == last
    assert len(await store.load(T, sid)) == 2


async def test_dedupe_ids_are_per_session(store: EventStore) -> None:
    a, b = new_sid(), new_sid()
    seq_a = await store.append(T, a, make_events(2), expected_last_seq=0, dedupe_id="same")
    seq_b = await store.append(T, b, make_events(2, "b"), expected_last_seq=0, dedupe_id="same")
    assert seq_b > seq_a
    assert [s.event for s in await store.load(T, b)] == make_events(2, "b")


async def test_empty_append_checks_position(store: EventStore) -> None:
    sid = new_sid()
    assert await store.append(T, sid, [], expected_last_seq=0) == 0
    last = await store.append(T, sid, make_events(1), expected_last_seq=0)
    assert await store.append(T, sid, [], expected_last_seq=last) == last
    with pytest.raises(ConcurrencyConflict):
        await store.append(T, sid, [], expected_last_seq=0)
    assert len(await store.load(T, sid)) == 1


async def test_sessions_are_isolated(store: EventStore) -> None:
    a, b = new_sid(), new_sid()
    seq_a = await store.append(T, a, make_events(2, "a"), expected_last_seq=0)
    # b's seqs interleave with a's in the global order, yet b expects its own last seq.
    seq_b = await store.append(T, b, make_events(2, "b"), expected_last_seq=0)
    seq_a = await store.append(T, a, make_events(1, "a2"), expected_last_seq=seq_a)
    assert [s.event for s in await store.load(T, a)] == make_events(2, "a") + make_events(1, "a2")
    assert [s.event for s in await store.load(T, b)] == make_events(2, "b")
    assert await store.last_seq(T, a) == seq_a and await store.last_seq(T, b) == seq_b
    assert seq_a > seq_b


async def test_sessions_lists_counts_and_last_seqs(store: EventStore) -> None:
    ids = sorted(new_sid() for _ in range(3))
    expected = []
    for n, sid in enumerate(ids, start=1):
        last = await store.append(T, sid, make_events(n), expected_last_seq=0)
        expected.append(SessionInfo(tenant=T, session_id=sid, events=n, last_seq=last))
    listed = await store.sessions()
    ours = [s for s in listed if s.session_id in ids]
    assert ours == expected
    keys = [(s.tenant, s.session_id) for s in listed]
    assert keys == sorted(keys)


async def test_many_events_page_through_batches(store: EventStore) -> None:
    sid = new_sid()
    events = make_events(1200)
    last = 0
    for start in range(0, len(events), 100):
        last = await store.append(T, sid, events[start : start + 100], expected_last_seq=last)
    loaded = await store.load(T, sid)
    assert len(loaded) == 1200
    assert [s.event for s in loaded] == events
    assert loaded[-1].seq == last
    tail = await store.load(T, sid, after=loaded[599].seq)
    assert [s.event for s in tail] == events[600:]


async def test_unknown_fields_are_ignored_on_read(harness: Harness) -> None:
    sid = new_sid()
    event = make_events(3)[2]
    doc = msgspec.to_builtins(event)
    doc["written_by_a_newer_version"] = {"nested": [1, 2, 3]}
    await harness.write_raw(sid, encode(doc))
    loaded = await harness.store.load(T, sid)
    assert [s.event for s in loaded] == [event]


# Events as Veil wrote them before model calls took one shape (ModelCall): a failed
# attempt, a reply that carried its call's fields at its top level, and an older
# reply that carried none (its call was a ModelCalled of its own).
_OLD_SHAPES = [
    (
        b'{"type":"model.called","at":"2026-01-01T00:00:00Z","turn_id":"t1","engine":"up",'
        b'"upstream_model":"m","latency_ms":4.5,"ttft_ms":null,"usage":null,'
        b'"finish_reason":null,"error":"rate limited","status":429,"purpose":"reply"}'
    ),
    (
        b'{"type":"reply.completed","at":"2026-01-01T00:00:01Z","turn_id":"t1","content":"hi",'
        b'"finish_reason":"stop","usage":{"prompt_tokens":3,"completion_tokens":1,'
        b'"total_tokens":4},"tool_calls":[],"alternatives":[],"engine":"up",'
        b'"upstream_model":"m","latency_ms":12.0,"ttft_ms":2.5}'
    ),
    (
        b'{"type":"reply.completed","at":"2026-01-01T00:00:02Z","turn_id":"t2","content":"yo",'
        b'"finish_reason":"stop","usage":{"prompt_tokens":1,"completion_tokens":1,'
        b'"total_tokens":2},"tool_calls":[],"alternatives":[]}'
    ),
]


async def test_events_of_older_shapes_read_as_todays(harness: Harness) -> None:
    sid = new_sid()
    for raw in _OLD_SHAPES:
        await harness.write_raw(sid, raw)
    attempt, reply, older = [s.event for s in await harness.store.load(T, sid)]
    usage = Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4)
    assert isinstance(attempt, ModelCalled) and attempt.turn_id == "t1"
    assert attempt.call == ModelCall(
        engine="up", upstream_model="m", latency_ms=4.5, error="rate limited", status=429
    )
    assert isinstance(reply, ReplyCompleted) and reply.content == "hi"
    assert reply.call == ModelCall(
        engine="up",
        upstream_model="m",
        latency_ms=12.0,
        ttft_ms=2.5,
        usage=usage,
        finish_reason="stop",
    )
    assert isinstance(older, ReplyCompleted) and older.call is None and older.content == "yo"
    assert [c.latency_ms for c in model_calls([attempt, reply, older])] == [4.5, 12.0]
    # What is written today reads back unchanged.
    assert EVENT_CODEC.decode(EVENT_CODEC.encode(reply)) == reply


async def test_invalid_session_id_is_refused(store: EventStore) -> None:
    for bad in ("a.b", "a*", ">", "with space", ""):
        with pytest.raises(InvalidToken):
            await store.append(T, bad, make_events(1), expected_last_seq=0)
        with pytest.raises(InvalidToken):
            await store.load(T, bad)
        # The tenant is a subject token too.
        with pytest.raises(InvalidToken):
            await store.append(bad, new_sid(), make_events(1), expected_last_seq=0)
        with pytest.raises(InvalidToken):
            await store.first(bad, new_sid())


async def test_the_same_id_in_two_tenants_is_two_sessions(store: EventStore) -> None:
    sid = new_sid()
    seq_a = await store.append("a", sid, [opened(sid, "a")], expected_last_seq=0, dedupe_id="c")
    # b's first append expects an empty log: a's events are not b's, nor is a's dedupe id.
    seq_b = await store.append("b", sid, [opened(sid, "b")], expected_last_seq=0, dedupe_id="c")
    assert seq_b > seq_a
    assert [s.event for s in await store.load("a", sid)] == [opened(sid, "a")]
    assert [s.event for s in await store.load("b", sid)] == [opened(sid, "b")]
    first_b = await store.first("b", sid)
    assert first_b is not None and first_b.event == opened(sid, "b")
    listed = {(s.tenant, s.session_id) for s in await store.sessions()}
    assert {("a", sid), ("b", sid)} <= listed
    assert await store.erase("a", sid) == 1
    assert await store.load("a", sid) == [] and await store.last_seq("a", sid) == 0
    assert await store.last_seq("b", sid) == seq_b


# JetStream only: what the contract cannot say about one backend.


@pytest.fixture
async def js_store(nc: Client) -> JetStreamEventStore:
    js = nc.jetstream()
    await ensure_stream(js)
    return JetStreamEventStore(js, nc, load_batch=4)


async def test_jetstream_retry_completes_a_batch_cut_short(js_store: JetStreamEventStore) -> None:
    sid = new_sid()
    events = make_events(5)
    # The first attempt died after two of five messages were stored.
    await js_store.append(T, sid, events[:2], expected_last_seq=0, dedupe_id="cmd")
    last = await js_store.append(T, sid, events, expected_last_seq=0, dedupe_id="cmd")
    assert last.reused == 2
    loaded = await js_store.load(T, sid)
    assert [s.event for s in loaded] == events
    assert loaded[-1].seq == last
    again = await js_store.append(T, sid, events, expected_last_seq=0, dedupe_id="cmd")
    assert again == last and again.reused == 5


async def test_jetstream_message_layout(js_store: JetStreamEventStore, nc: Client) -> None:
    sid = new_sid()
    events = make_events(2)
    last = await js_store.append(T, sid, events, expected_last_seq=0, dedupe_id="cmd")
    js = nc.jetstream()
    msg = await js.get_msg(EVENTS_STREAM, last, direct=True)
    assert msg.subject == session_events(T, sid)
    assert msg.headers is not None
    assert msg.headers[EVENT_TYPE_HEADER] == "model.called"
    assert msg.headers["Nats-Msg-Id"] == f"{T}.{sid}:cmd:1"
    assert CODEC.decode(msg.data or b"") == events[1]


def _legacy_log(sid: str, tenant: str) -> list[EventUnion]:
    return [opened(sid, tenant), *make_events(2)]


async def _write_legacy(nc: Client, sid: str, tenant: str) -> None:
    """A session as Veil wrote it before sessions were per tenant: under its id alone."""
    js = nc.jetstream()
    for event in _legacy_log(sid, tenant):
        await js.publish(legacy_session_events(sid), CODEC.encode(event), stream=EVENTS_STREAM)


async def test_jetstream_reads_and_continues_a_legacy_log_where_it_is(nc: Client) -> None:
    sid = new_sid()
    await _write_legacy(nc, sid, "acme")
    js = nc.jetstream()
    store = JetStreamEventStore(js, nc)  # a store of the new version, started on old data
    assert await store.legacy_tenant(sid) == "acme"
    assert [s.event for s in await store.load("acme", sid)] == _legacy_log(sid, "acme")
    assert await store.subject("acme", sid) == legacy_session_events(sid)
    # Another tenant's session of that id is a free one, on its own subject.
    assert await store.load("other", sid) == [] and await store.first("other", sid) is None
    assert await store.subject("other", sid) == session_events("other", sid)
    # Continued where it is: the stream's sequences that others point at never change.
    last = await store.last_seq("acme", sid)
    later = await store.append("acme", sid, make_events(1, "t9"), expected_last_seq=last)
    msg = await js.get_msg(EVENTS_STREAM, later, direct=True)
    assert msg.subject == legacy_session_events(sid)
    assert len(await store.load("acme", sid)) == 4
    listed = [s for s in await store.sessions() if s.session_id == sid]
    assert listed == [SessionInfo(tenant="acme", session_id=sid, events=4, last_seq=later)]
    await store.append("other", sid, [opened(sid, "other")], expected_last_seq=0)
    assert await store.tenants_of(sid) == ["acme", "other"]
    assert await store.erase("acme", sid) == 4
    assert await store.load("acme", sid) == [] and len(await store.load("other", sid)) == 1


async def test_tombstones_are_per_tenant_and_old_ones_still_count(nc: Client) -> None:
    js = nc.jetstream()
    log = TombstoneLog(js, nc)
    await log.ensure()
    sid, old = new_sid(), new_sid()
    await log.record(Tombstone(session_id=sid, tenant="a", deleted_by="k", at=T0))
    assert (await log.get("a", sid)) is not None and await log.get("b", sid) is None
    # One recorded before sessions were per tenant counts for its own tenant only.
    legacy = Tombstone(session_id=old, tenant="a", deleted_by="k", at=T0)
    await js.publish(legacy_session_tombstone(old), msgspec.json.encode(legacy))
    assert await log.get("a", old) == legacy and await log.get("b", old) is None
    assert {(t.tenant, t.session_id) for t in await log.all()} >= {("a", sid), ("a", old)}


async def test_jetstream_missing_stream_is_unavailable(nc: Client) -> None:
    store = JetStreamEventStore(nc.jetstream(), nc, stream="NO_SUCH_STREAM", timeout=1.0)
    with pytest.raises(StoreUnavailable):
        await store.load(T, new_sid())
    with pytest.raises(StoreUnavailable):
        await store.last_seq(T, new_sid())
    with pytest.raises(StoreUnavailable):
        await store.sessions()
    # The subject belongs to CHAT_EVENTS, and the publish names another stream.
    with pytest.raises(EventStoreError):
        await store.append(T, new_sid(), make_events(1), expected_last_seq=0)


async def test_jetstream_closed_connection_is_unavailable(nats_url: str) -> None:
    client = await nats.connect(nats_url)
    store = JetStreamEventStore(client.jetstream(), client, timeout=1.0)
    await client.close()
    with pytest.raises(StoreUnavailable):
        await store.load(T, new_sid())
    with pytest.raises(StoreUnavailable):
        await store.append(T, new_sid(), make_events(1), expected_last_seq=0)
    with pytest.raises(StoreUnavailable):
        await store.last_seq(T, new_sid())


def test_jetstream_refuses_batch_zero(nc: Client) -> None:
    with pytest.raises(ValueError):
        JetStreamEventStore(nc.jetstream(), nc, load_batch=0)


async def test_ensure_stream_is_idempotent_and_repairs(nc: Client) -> None:
    js = nc.jetstream()
    first = await ensure_stream(js)
    again = await ensure_stream(js)
    assert again.config == first.config
    assert first.config.allow_direct and first.config.duplicate_window == 120.0
    # An operator changed the window and added a description.
    await js.update_stream(first.config.evolve(duplicate_window=5.0, description="ops note"))
    repaired = await ensure_stream(js)
    assert repaired.config.duplicate_window == 120.0
    assert repaired.config.description == "ops note"
    assert repaired.config.max_msgs == -1 and repaired.config.max_age == 0


async def test_jetstream_silent_or_odd_server(nc: Client) -> None:
    """A direct get that never ends its batch times out; an unknown status is an error."""

    async def never_ends(msg: Msg) -> None:
        headers = {"Nats-Sequence": "1", "Nats-Subject": "chat.events.x"}
        await nc.publish(msg.reply, CODEC.encode(make_events(1)[0]), headers=headers)

    async def odd_status(msg: Msg) -> None:
        await nc.publish(msg.reply, b"", headers={"Status": "408", "Description": "Bad"})

    await nc.subscribe("$JS.API.DIRECT.GET.FAKE_SILENT", cb=never_ends)
    await nc.subscribe("$JS.API.DIRECT.GET.FAKE_ODD", cb=odd_status)
    silent = JetStreamEventStore(nc.jetstream(), nc, stream="FAKE_SILENT", timeout=0.2)
    with pytest.raises(StoreUnavailable):
        await silent.load(T, "x")
    odd = JetStreamEventStore(nc.jetstream(), nc, stream="FAKE_ODD", timeout=0.2)
    with pytest.raises(EventStoreError) as info:
        await odd.load(T, "x")
    assert not isinstance(info.value, StoreUnavailable) and "408" in str(info.value)
    with pytest.raises(EventStoreError):
        await odd.last_seq(T, "x")


async def test_jetstream_lists_subjects_page_by_page(nc: Client) -> None:
    """The server answers a subjects filter 100,000 subjects at a time: every page is read
    (else sessions past the first page would not be listed, nor old logs found)."""
    subjects = {f"chat.events.t.s{i}": i + 1 for i in range(5)}
    subjects["chat.events.legacy"] = 3

    async def paged(msg: Msg) -> None:
        offset = json.loads(msg.data)["offset"]
        page = dict(list(subjects.items())[offset : offset + 2])
        answer = {"state": {"subjects": page}, "total": len(subjects), "offset": offset}
        await nc.publish(msg.reply, json.dumps(answer).encode())

    # (The real server answers every stream's info, so the fake serves a subject of its own.)
    await nc.subscribe("test.fake.stream.info", cb=paged)
    store = JetStreamEventStore(nc.jetstream(), nc, timeout=1.0)
    store._info_subject = "test.fake.stream.info"
    assert await store._subjects("chat.events.>") == subjects
    assert [(s.tenant, s.session_id) for s in await store.sessions()][:1] == [("t", "s0")]


def test_header_values_as_lists() -> None:
    # nats-py hands header values over as lists when fast_mail_parser is installed.
    assert _header({"Nats-Sequence": ["42"]}, "Nats-Sequence") == "42"
    assert _header({"Nats-Sequence": "42"}, "Nats-Sequence") == "42"
    assert _header({}, "Nats-Sequence") is None


async def test_erase_removes_every_event(store: EventStore) -> None:
    sid, other = new_sid(), new_sid()
    await store.append(T, sid, make_events(3), expected_last_seq=0, dedupe_id="c1")
    await store.append(T, other, [opened(other)], expected_last_seq=0)
    assert await store.erase(T, sid) == 3
    assert await store.load(T, sid) == []
    assert await store.last_seq(T, sid) == 0
    assert sid not in [s.session_id for s in await store.sessions()]
    assert len(await store.load(T, other)) == 1
    # The id can start over from an empty log.
    await store.append(T, sid, [opened(sid)], expected_last_seq=0, dedupe_id="c2")
    assert len(await store.load(T, sid)) == 1


async def test_first_is_the_opening_event(store: EventStore) -> None:
    sid = new_sid()
    assert await store.first(T, sid) is None
    events: list[EventUnion] = [opened(sid), *make_events(4)]
    await store.append(T, sid, events[:2], expected_last_seq=0)
    last = await store.last_seq(T, sid)
    await store.append(T, sid, events[2:], expected_last_seq=last)
    first = await store.first(T, sid)
    assert first is not None and first.event == opened(sid)
    assert first.seq == (await store.load(T, sid))[0].seq
    await store.erase(T, sid)
    assert await store.first(T, sid) is None
