"""Figures for session snapshots: activating a 10,000-event session from its whole log
and from a snapshot, side by side, and the session actor's per-command latency in a
young and an old session.

Run: python bench/session_activation.py   (spawns its own nats-server with the repo's
nats.conf; about a minute)

Activation is the session actor's first read (`SessionActor._reload`: snapshot get,
last_seq, load of the events after it, fold) against a real JetStream; no tombstone
log, so both columns leave out the same one direct get.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import session, snapshots
from actors.leases import Leases
from actors.session_actor import SessionActor, SessionContext
from bench._stats import percentile
from bus.runtime import Envelope
from bus.signals import Signals
from bus.subjects import SESSION_CANCEL_WILDCARD, session_key
from config import Config
from contracts.conversations import AddItems
from eventstore.events import (
    ChatMessage,
    EventUnion,
    ReplyCompleted,
    SessionOpened,
    TurnStarted,
    Usage,
)
from eventstore.jetstream import JetStreamEventStore, ensure_stream
from eventstore.snapshots import JetStreamSnapshotStore, SnapshotStore
from testkit.procs import nats_server

__all__ = ["main"]

EVENTS = 10_000
# Where the latest snapshot sits: the actor writes one every SNAPSHOT_EVERY events, so
# on average half that many follow it.
TAIL = snapshots.SNAPSHOT_EVERY // 2
RUNS_FULL = 5
RUNS_SNAPSHOT = 30
EDITS = 200
TENANT = "bench"
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def turn_events(i: int) -> list[EventUnion]:
    """One chat-sized turn: a question and its reply."""
    at = T0 + timedelta(seconds=i)
    question = f"Question {i}: how do I reverse a list in Python, and which way is fastest? "
    return [
        TurnStarted(
            at=at,
            turn_id=f"t{i}",
            command_id=f"c{i}",
            model="small",
            messages=[ChatMessage(role="user", content=question * 2)],
            lease_until=at + timedelta(seconds=30),
        ),
        ReplyCompleted(
            at=at,
            turn_id=f"t{i}",
            content=f"Answer {i}: use reversed(xs) or xs[::-1]; xs.reverse() works in place. " * 3,
            finish_reason="stop",
            usage=Usage(prompt_tokens=40, completion_tokens=60, total_tokens=100),
            call=None,
        ),
    ]


def log_of(session_id: str, events: int) -> list[EventUnion]:
    log: list[EventUnion] = [SessionOpened(at=T0, session_id=session_id, tenant=TENANT, key_id="k")]
    i = 0
    while len(log) < events:
        log.extend(turn_events(i))
        i += 1
    return log[:events]


async def fill(store: JetStreamEventStore, session_id: str, events: list[EventUnion]) -> list[int]:
    """Append the log in batches of 100, as a writer with the expected seq would."""
    seqs: list[int] = []
    last = 0
    for start in range(0, len(events), 100):
        batch = events[start : start + 100]
        last = await store.append(TENANT, session_id, batch, expected_last_seq=last)
        seqs.extend(range(last - len(batch) + 1, last + 1))  # one writer: contiguous here
    return seqs


def context(nc: Any, store: JetStreamEventStore, snaps: SnapshotStore | None) -> SessionContext:
    return SessionContext(
        nc=nc,
        store=store,
        config=Config(),
        signals=Signals(nc, SESSION_CANCEL_WILDCARD),
        leases=Leases(nc),
        snapshots=snaps,
    )


async def activations(ctx: SessionContext, session_id: str, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        actor = SessionActor(session_key(TENANT, session_id), ctx)
        started = time.perf_counter()
        await actor._reload()
        samples.append((time.perf_counter() - started) * 1e3)
        assert actor.snapshot()[0].events == EVENTS
    return samples


class _Request:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}

    async def respond(self, data: bytes) -> None:
        pass


async def edit_latency(ctx: SessionContext, session_id: str) -> list[float]:
    """An edit through the actor's mailbox path: decide, append with the expected seq,
    evolve (and, every SNAPSHOT_EVERY events, a snapshot's write started)."""
    actor = SessionActor(session_key(TENANT, session_id), ctx)
    await actor._reload()
    before = actor.snapshot()[0].events
    samples = []
    for i in range(EDITS):
        add = AddItems(
            session_id=session_id,
            tenant=TENANT,
            key_id="k",
            messages=[ChatMessage(role="user", content=f"note {i}: keep it short. " * 4)],
        )
        started = time.perf_counter()
        await actor.receive(Envelope(_Request(), add))  # type: ignore[arg-type]
        samples.append((time.perf_counter() - started) * 1e3)
    await actor.stop()
    assert actor.snapshot()[0].events == before + EDITS, "every edit was appended"
    return samples


def row(name: str, samples: list[float]) -> str:
    return (
        f"{name:<34} p50 {statistics.median(samples):8.1f} ms   "
        f"p99 {percentile(samples, 99):8.1f} ms   (n={len(samples)})"
    )


async def run(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_stream(js)
    store = JetStreamEventStore(js, nc)
    snaps = await JetStreamSnapshotStore.open(js, replicas=1)

    events = log_of("long", EVENTS)
    seqs = await fill(store, "long", events)
    covered = EVENTS - TAIL
    state = session.fold(events[:covered])
    data = snapshots.encode(TENANT, "long", seqs[covered - 1], state)
    await snaps.put(TENANT, "long", data)
    print(
        f"session: {EVENTS:,} events ({state.turns:,} turns, {len(state.history):,} messages);"
        f" snapshot of the first {covered:,}: {len(data) / 1e6:.1f} MB msgpack"
    )
    started = time.perf_counter()
    snapshots.decode(data, TENANT, "long")
    print(f"  snapshot decode alone: {(time.perf_counter() - started) * 1e3:.1f} ms")

    full = await activations(context(nc, store, None), "long", RUNS_FULL)
    fast = await activations(context(nc, store, snaps), "long", RUNS_SNAPSHOT)
    print(f"activation of a {EVENTS:,}-event session (same run, same server):")
    print(row("  whole log (no snapshot)", full))
    print(row(f"  snapshot + {TAIL} events", fast))

    for turns in (10, 1_000):
        sid = f"at{turns}"
        await fill(store, sid, log_of(sid, 1 + 2 * turns))
        for name, snaps_or_none in (("no snapshots", None), ("snapshots", snaps)):
            samples = await edit_latency(context(nc, store, snaps_or_none), sid)
            print(row(f"edit at turn {turns:,} ({name})", samples))
    await nc.drain()


def main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="veil-bench-") as tmp,
        nats_server(Path(tmp) / "js") as server,
    ):
        asyncio.run(run(server.url))


if __name__ == "__main__":
    main()
