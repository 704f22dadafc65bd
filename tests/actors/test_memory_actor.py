"""The memory projection follows the log: it catches up after a restart and honours tombstones."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import nats
import numpy as np
import numpy.typing as npt
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from actors.memory.actor import MemoryActor, Progress
from actors.memory.embedder import Embedder, default_embedder
from actors.memory.index import MemoryIndex, MemoryRecord
from actors.memory.projector import Projector
from bus.codec import Codec
from bus.loop_share import LoopShare
from bus.subjects import session_events
from contracts.memory import RecallRequest
from eventstore.events import (
    ChatMessage,
    EventUnion,
    ReplyCompleted,
    SessionOpened,
    TurnStarted,
    Usage,
)
from eventstore.jetstream import JetStreamEventStore, ensure_stream
from eventstore.store import EventStore
from eventstore.tombstones import Tombstone, TombstoneLog
from veil.natsserver import NatsServer

T0 = datetime(2026, 5, 1, tzinfo=UTC)


@pytest.fixture
async def nc(tmp_path: Path) -> AsyncIterator[Client]:
    server = NatsServer(tmp_path / "nats")
    url = await server.astart()
    client = await nats.connect(url)
    await ensure_stream(client.jetstream())
    await TombstoneLog(client.jetstream(), client).ensure()
    yield client
    await client.close()
    server.stop()


async def write_turn(
    store: JetStreamEventStore, sid: str, text: str, reply: str, *, new: bool
) -> None:
    events: list = []
    if new:
        events.append(SessionOpened(at=T0, session_id=sid, tenant="t", key_id="k", user_id="u"))
    turn = f"turn-{text[:8].replace(' ', '-')}"
    events.append(
        TurnStarted(
            at=T0,
            turn_id=turn,
            command_id=turn,
            model="veil",
            messages=[ChatMessage(role="user", content=text)],
            lease_until=T0 + timedelta(minutes=5),
        )
    )
    events.append(
        ReplyCompleted(
            at=T0, turn_id=turn, content=reply, finish_reason="stop", usage=Usage(), call=None
        )
    )
    await store.append("t", sid, events, expected_last_seq=await store.last_seq("t", sid))


async def start_actor(
    nc: Client, path: Path, *, max_lag: float = 0.0, load: LoopShare | None = None
) -> tuple[MemoryActor, MemoryIndex]:
    js = nc.jetstream()
    index = await MemoryIndex.open(path, model=default_embedder().model_id)
    actor = MemoryActor(
        nc,
        js,
        index,
        default_embedder(),
        store=JetStreamEventStore(js, nc),
        tombstones=TombstoneLog(js, nc),
        version="0.0.0",
        max_lag=max_lag,
        loop_share=load,
    )
    await actor.start()
    return actor, index


async def caught_up(nc: Client, index: MemoryIndex) -> None:
    last = (await nc.jetstream().stream_info("CHAT_EVENTS")).state.last_seq
    for _ in range(500):
        if await index.checkpoint() >= last:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the projection did not catch up")


async def test_catches_up_after_a_restart_and_drops_tombstoned_sessions(
    nc: Client, tmp_path: Path
) -> None:
    js = nc.jetstream()
    store = JetStreamEventStore(js, nc)
    path = tmp_path / "memory.sqlite"
    await write_turn(store, "s1", "My cat is called Pixel.", "Nice name!", new=True)
    actor, index = await start_actor(nc, path)
    await caught_up(nc, index)
    assert await index.count() == 1  # one item a turn: the message and its reply
    await actor.stop()
    await index.close()

    # While the memory actor is down: more turns, a new session, and a deletion.
    await write_turn(store, "s1", "I moved to Lisbon in March.", "Welcome to Lisbon!", new=False)
    await write_turn(store, "s2", "The boiler code is 4471.", "Noted.", new=True)
    await TombstoneLog(js, nc).record(Tombstone(session_id="s2", tenant="t", deleted_by="k", at=T0))

    actor, index = await start_actor(nc, path)
    await caught_up(nc, index)
    try:
        assert await index.count() == 2  # s1's two turns; s2 never comes back
        hits = await actor.recall(
            RecallRequest(
                tenant="t", session_id="s1", user_id="u", query="which city did I move to"
            )
        )
        assert hits[0].text == "I moved to Lisbon in March.\nAssistant: Welcome to Lisbon!"
        assert all(h.session_id != "s2" for h in hits)
        assert await index.checkpoint() == (await js.stream_info("CHAT_EVENTS")).state.last_seq
    finally:
        await actor.stop()
        await index.close()


async def test_an_index_made_by_another_model_is_rebuilt_from_the_log(
    nc: Client, tmp_path: Path
) -> None:
    js = nc.jetstream()
    store = JetStreamEventStore(js, nc)
    path = tmp_path / "memory.sqlite"
    await write_turn(store, "s4", "My bike is a green Brompton.", "Lovely bike.", new=True)
    last = (await js.stream_info("CHAT_EVENTS")).state.last_seq
    # An index that an older model built up to the end of the log.
    older = await MemoryIndex.open(path, model="an-older-model")
    stale = MemoryRecord(
        id="s4:stale",
        tenant="t",
        user_id="u",
        session_id="s4",
        kind="message",
        role="user",
        text="a vector from the older model",
        source_seq=1,
        created_at=T0,
    )
    await older.add([stale], np.eye(1, 384, dtype=np.float32), checkpoint=last)
    await older.close()

    actor, index = await start_actor(nc, path)
    try:
        assert index.model_changed
        await caught_up(nc, index)
        assert await index.count() == 1
        hits = await actor.recall(
            RecallRequest(tenant="t", session_id="s4", user_id="u", query="what bike do I have")
        )
        assert [h.text for h in hits] == ["My bike is a green Brompton.\nAssistant: Lovely bike."]
    finally:
        await actor.stop()
        await index.close()


async def test_a_live_tombstone_removes_rows(nc: Client, tmp_path: Path) -> None:
    js = nc.jetstream()
    store = JetStreamEventStore(js, nc)
    await write_turn(store, "s3", "My passport number ends in 9921.", "Got it.", new=True)
    actor, index = await start_actor(nc, tmp_path / "memory.sqlite")
    try:
        await caught_up(nc, index)
        assert await index.count() == 1
        await TombstoneLog(js, nc).record(
            Tombstone(session_id="s3", tenant="t", deleted_by="k", at=T0)
        )
        for _ in range(200):
            if await index.count() == 0:
                break
            await asyncio.sleep(0.02)
        assert await index.count() == 0
    finally:
        await actor.stop()
        await index.close()


async def memory_stats(nc: Client) -> dict[str, Any]:
    """The recall endpoint's data in the service's $SRV.STATS answer (`nats micro stats veil-memory`)."""
    reply = await nc.request("$SRV.STATS.veil-memory", b"", timeout=5)
    stats = json.loads(reply.data)
    return next(e["data"] for e in stats["endpoints"] if e["name"] == "recall")


class Switch(LoopShare):
    """The event loop's load as the test sets it: busy or quiet, whatever the machine does."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded = True

    async def busy(self, threshold: float = 0.0) -> bool:
        await asyncio.sleep(0.01)
        return self.loaded


async def _until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(1500):  # a hang detector, not a time limit on the work
        if await condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"gave up waiting for {what}")


@contextlib.asynccontextmanager
async def written_under_load(
    nc: Client, tmp_path: Path, max_lag: float, text: str
) -> AsyncIterator[tuple[MemoryIndex, Switch]]:
    """A memory actor that sees the loop busy, and a turn written to the log meanwhile."""
    load = Switch()
    actor, index = await start_actor(nc, tmp_path / "memory.sqlite", max_lag=max_lag, load=load)
    try:
        store = JetStreamEventStore(nc.jetstream(), nc)
        await write_turn(store, "s5", text, "Noted.", new=True)
        yield index, load
    finally:
        await actor.stop()
        await index.close()


async def _gave_way(nc: Client) -> bool:
    return int((await memory_stats(nc))["gave_way"]) >= 1


async def test_indexing_gives_way_to_a_busy_loop(nc: Client, tmp_path: Path) -> None:
    async with written_under_load(nc, tmp_path, 30.0, "My locker is number 312.") as (index, _):
        await _until(lambda: _gave_way(nc), "the projection to give way")
        assert await index.count() == 0  # the turns go first
        held = await memory_stats(nc)
    assert held["lag_seconds"] > 0 and held["applied_seq"] == 0 and held["max_lag"] == 30.0


async def test_indexing_catches_up_once_the_loop_quiets_down(nc: Client, tmp_path: Path) -> None:
    async with written_under_load(nc, tmp_path, 30.0, "My locker is number 312.") as (
        index,
        load,
    ):
        await _until(lambda: _gave_way(nc), "the projection to give way")
        load.loaded = False
        await caught_up(nc, index)
        assert await index.count() == 1
        done = await memory_stats(nc)
        last = (await nc.jetstream().stream_info("CHAT_EVENTS")).state.last_seq
        assert done["applied_seq"] == last and done["lag_seconds"] == 0.0


async def test_indexing_goes_ahead_when_the_log_is_max_lag_behind(
    nc: Client, tmp_path: Path
) -> None:
    started = time.monotonic()
    async with written_under_load(nc, tmp_path, 1.5, "The spare key is under the blue pot.") as (
        index,
        _,
    ):
        await caught_up(nc, index)  # while the loop stays busy
        waited = time.monotonic() - started
        assert await index.count() == 1
        assert await _gave_way(nc)
    assert waited >= 1.4  # held back until the turn was max_lag old (later on a slow machine)


def stored_message(seq: int, seconds_ago: float) -> Msg:
    """A CHAT_EVENTS message as a consumer receives it: seq and stored time in its ack subject."""
    stored_ns = int((time.time() - seconds_ago) * 1e9)
    return Msg(
        _client=None,
        subject="chat.events.s",
        reply=f"$JS.ACK.CHAT_EVENTS.c.1.{seq}.{seq}.{stored_ns}.0",
    )  # type: ignore[arg-type]


def test_progress_lag_is_the_age_of_the_oldest_event_not_indexed() -> None:
    progress = Progress()
    assert progress.lag_seconds() == 0.0
    progress.applied(stored_message(7, seconds_ago=12.0), more=True)  # behind: more was waiting
    assert progress.applied_seq == 7
    assert 11.5 < progress.lag_seconds() < 13.0
    progress.applied(stored_message(9, seconds_ago=0.5), more=False)  # caught up
    assert progress.lag_seconds() == 0.0
    progress.holding(stored_message(10, seconds_ago=2.0))  # held back for a busy loop
    assert 1.5 < progress.lag_seconds() < 3.0
    assert progress.stats()["gave_way"] == 1 and 1.5 < float(progress.stats()["lag_seconds"]) < 3.0  # type: ignore[arg-type]


class HeldEmbedder:
    """Random unit vectors; the first call waits until the test lets it go."""

    dim = 384
    model_id = "held"

    def __init__(self) -> None:
        self.embedding = asyncio.Event()
        self.release = asyncio.Event()
        self.texts: list[str] = []

    async def aembed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if not self.embedding.is_set():
            self.embedding.set()
            await self.release.wait()
        self.texts.extend(texts)
        v = np.random.default_rng(len(self.texts)).standard_normal((len(texts), self.dim))
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def logged(sid: str, first_seq: int, texts: list[str]) -> list[tuple[str, int, bytes]]:
    """A new session's events as the projection reads them: (subject, seq, data)."""
    codec: Codec[EventUnion] = Codec(EventUnion)
    events: list[EventUnion] = [
        SessionOpened(at=T0, session_id=sid, tenant="t", key_id="k", user_id="u"),
        TurnStarted(
            at=T0,
            turn_id="turn-1",
            command_id="turn-1",
            model="veil",
            messages=[ChatMessage(role="user", content=text) for text in texts],
            lease_until=T0 + timedelta(minutes=5),
        ),
        ReplyCompleted(
            at=T0,
            turn_id="turn-1",
            content=texts[-1],
            finish_reason="stop",
            usage=Usage(),
            call=None,
        ),
    ]
    subject = session_events("t", sid)
    return [(subject, first_seq + i, codec.encode(e)) for i, e in enumerate(events)]


async def test_a_session_forgotten_while_its_batch_is_embedded_stays_forgotten(
    tmp_path: Path,
) -> None:
    path = tmp_path / "memory.sqlite"
    index = await MemoryIndex.open(path)
    embedder = HeldEmbedder()
    # No store: every session of these batches opens in them.
    projector = Projector(index, cast(Embedder, embedder), cast(EventStore, None))
    marker = "quokkamarker"
    try:
        batch = logged("s8", 1, ["My bike is green."]) + logged(
            "s9", 4, [f"The vault code is {marker} {i}." for i in range(3)]
        )
        applying = asyncio.create_task(projector.apply(batch))
        await embedder.embedding.wait()
        # What the memory actor does on `memory.forget` or a tombstone, mid-embedding.
        projector.forget("t", "s9")
        assert await index.delete_session("t", "s9") == 0
        embedder.release.set()
        await applying

        assert await index.checkpoint() == 6
        assert {row[3] for row in await index.dump()} == {"s8"}
        hits = await index.keyword_search(
            tenant="t", session_id="s9", user_id="u", query_text=marker
        )
        assert hits == []
        # A batch read after the deletion is not even embedded.
        embedded = len(embedder.texts)
        await projector.apply(logged("s9", 7, [f"Also {marker} again."]))
        assert (await index.count(), await index.checkpoint()) == (1, 9)
        assert embedder.texts[embedded:] == []
    finally:
        await index.close()
    assert marker.encode() not in b"".join(p.read_bytes() for p in tmp_path.glob("memory.sqlite*"))
