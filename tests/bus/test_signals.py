"""Cancellation signals: one wildcard subscription, dispatched by subject."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client

from bus.signals import Signals
from bus.subjects import SESSION_CANCEL_WILDCARD, session_cancel


async def test_each_watcher_hears_its_own_subject_until_it_stops_watching(nc: Client) -> None:
    signals = Signals(nc, SESSION_CANCEL_WILDCARD)
    heard: list[str] = []
    stop_a = await signals.watch(session_cancel("s1", "t1"), lambda: heard.append("a"))
    await signals.watch(session_cancel("s1", "t1"), lambda: heard.append("b"))
    await signals.watch(session_cancel("s1", "t2"), lambda: heard.append("other turn"))

    async def cancel(turn: str) -> None:
        await nc.publish(session_cancel("s1", turn), b"{}")
        await nc.flush()
        await asyncio.sleep(0.05)

    await cancel("t1")
    assert sorted(heard) == ["a", "b"]
    stop_a()
    await cancel("t1")
    assert sorted(heard) == ["a", "b", "b"]
    await cancel("t3")  # nobody watches it
    assert len(heard) == 3
