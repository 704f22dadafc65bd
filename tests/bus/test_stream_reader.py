"""Reading a stream in batches: order, starting point, and a bounded buffer when the reader lags."""

from __future__ import annotations

import asyncio
import uuid

from nats.aio.client import Client
from nats.js.api import StreamConfig

from bus.stream_reader import StreamReader


async def a_stream(nc: Client, count: int) -> tuple[str, str]:
    """A fresh stream holding `count` messages numbered from 1; returns (name, wildcard)."""
    name = f"READER_{uuid.uuid4().hex[:8].upper()}"
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name.lower()}.>"]))
    for i in range(1, count + 1):
        await js.publish(f"{name.lower()}.s{i % 7}", str(i).encode())
    return name, f"{name.lower()}.>"


async def read_all(reader: StreamReader, sizes: list[int] | None = None) -> list[int]:
    seen: list[int] = []
    while batch := await reader.next_batch(timeout=1):
        seen += [int(m.data) for m in batch]
        if sizes is not None:
            sizes.append(len(batch))
    return seen


async def test_batches_come_in_stream_order_from_the_start_sequence(nc: Client) -> None:
    name, subjects = await a_stream(nc, 300)
    sizes: list[int] = []
    async with StreamReader(nc.jetstream(), subjects, batch=64, wait=0.01) as reader:
        assert await read_all(reader, sizes) == list(range(1, 301))
    assert max(sizes) == 64 and len(sizes) >= 5
    async with StreamReader(nc.jetstream(), subjects, start_seq=250, batch=64) as reader:
        first = await reader.next_batch()
        assert [int(m.data) for m in first] == list(range(250, 301))
        assert first[-1].metadata.num_pending == 0
        assert await reader.next_batch(timeout=0.2) == []  # nothing more: no wait forever
    await nc.jetstream().delete_stream(name)


async def test_a_lagging_reader_holds_a_bounded_buffer_and_loses_nothing(nc: Client) -> None:
    name, subjects = await a_stream(nc, 2000)
    async with StreamReader(nc.jetstream(), subjects, batch=50, wait=0) as reader:
        await asyncio.sleep(0.5)  # the whole stream could have arrived by now
        assert 0 < reader.buffered <= 4 * 50
        seen = await read_all(reader)
    assert seen == list(range(1, 2001))
    await nc.jetstream().delete_stream(name)
