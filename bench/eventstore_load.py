"""Figures for the JetStream event store: append rate and per-session load latency.

Run: python bench/eventstore_load.py   (spawns its own nats-server; under a minute)
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import percentile
from bus.codec import Codec
from bus.subjects import EVENTS_STREAM, session_events
from eventstore.events import ChatMessage, EventUnion, ReplyCompleted, TurnStarted, Usage
from eventstore.jetstream import JetStreamEventStore, ensure_stream
from testkit.procs import nats_server

__all__ = ["main"]

SESSIONS = 100
EVENTS_PER_SESSION = 1_000
APPENDS = 2_000
LOADS = 200
T0 = datetime(2026, 11, 26, tzinfo=UTC)
CODEC: Codec[EventUnion] = Codec(EventUnion)


def event(i: int) -> EventUnion:
    """Alternate a user turn and a reply, roughly chat-sized."""
    if i % 2 == 0:
        return TurnStarted(
            at=T0 + timedelta(seconds=i),
            turn_id=f"t{i}",
            command_id=f"c{i}",
            model="small",
            messages=[ChatMessage(role="user", content="How do I reverse a list in Python? " * 3)],
            lease_until=T0 + timedelta(seconds=i + 30),
        )
    return ReplyCompleted(
        at=T0 + timedelta(seconds=i),
        turn_id=f"t{i - 1}",
        content="Use reversed(xs) or xs[::-1]; xs.reverse() reverses in place. " * 4,
        finish_reason="stop",
        usage=Usage(prompt_tokens=40, completion_tokens=60, total_tokens=100),
        call=None,
    )


async def run(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=4_000)
    await ensure_stream(js)

    # 100 sessions interleaved round-robin: the target's events are spread over the stream.
    started = time.perf_counter()
    bodies = [CODEC.encode(event(i)) for i in range(EVENTS_PER_SESSION)]
    for i in range(EVENTS_PER_SESSION):
        for s in range(SESSIONS):
            await js.publish_async(
                session_events("bench", f"s{s:03d}"), bodies[i], stream=EVENTS_STREAM
            )
    await js.publish_async_completed()
    fill = time.perf_counter() - started
    total = SESSIONS * EVENTS_PER_SESSION
    print(f"fill: {total:,} events in {fill:.1f} s ({total / fill:,.0f}/s, async, no expected seq)")

    store = JetStreamEventStore(js, nc)
    for batch in (1, 10):
        last, n = 0, 0
        sid = f"append-{batch}"
        started = time.perf_counter()
        while n < APPENDS:
            events = [event(n + k) for k in range(batch)]
            last = await store.append(
                "bench", sid, events, expected_last_seq=last, dedupe_id=f"cmd{n}"
            )
            n += batch
        took = time.perf_counter() - started
        print(
            f"append: {APPENDS / took:,.0f} events/s sequential, {batch} event(s) per append"
            f" with expected seq + dedupe id ({took / (APPENDS / batch) * 1e3:.2f} ms per append)"
        )

    for load_batch in (256, 512, 1000):
        store = JetStreamEventStore(js, nc, load_batch=load_batch)
        assert len(await store.load("bench", "s050")) == EVENTS_PER_SESSION
        samples = []
        for _ in range(LOADS):
            started = time.perf_counter()
            await store.load("bench", "s050")
            samples.append((time.perf_counter() - started) * 1e3)
        print(
            f"load 1,000 of {total + 2 * APPENDS:,} events, batch {load_batch}: "
            f"p50 {percentile(samples, 50):.1f} ms, p99 {percentile(samples, 99):.1f} ms"
        )

    samples = []
    for _ in range(LOADS):
        started = time.perf_counter()
        await store.last_seq("bench", "s050")
        samples.append((time.perf_counter() - started) * 1e3)
    print(f"last_seq: p50 {percentile(samples, 50):.2f} ms, p99 {percentile(samples, 99):.2f} ms")

    started = time.perf_counter()
    listed = await store.sessions()
    took = (time.perf_counter() - started) * 1e3
    print(f"sessions(): {len(listed)} sessions in {took:.0f} ms")
    await nc.drain()


def main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="veil-bench-") as tmp,
        nats_server(Path(tmp) / "js") as server,
    ):
        asyncio.run(run(server.url))


if __name__ == "__main__":
    main()
