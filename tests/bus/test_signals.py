"""Cancellation signals: one wildcard subscription, dispatched by subject."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client

from bus.signals import Signals
from bus.subjects import SESSION_CANCEL_WILDCARD, session_cancel


async def test_each_watcher_hears_its_own_subject_until_it_stops_watching(nc: Client) -> None:
    signals = Signals(nc, SESSION_CANCEL_WILDCARD)
    heard: list[str] = []
    stop_a = await signals.watch(session_cancel("acme", "s1", "t1"), lambda: heard.append("a"))
    await signals.watch(session_cancel("acme", "s1", "t1"), lambda: heard.append("b"))
    await signals.watch(session_cancel("acme", "s1", "t2"), lambda: heard.append("other turn"))

    async def cancel(turn: str) -> None:
        await nc.publish(session_cancel("acme", "s1", turn), b"{}")
        await nc.flush()
        await asyncio.sleep(0.05)

    await cancel("t1")
    assert sorted(heard) == ["a", "b"]
    stop_a()
    await cancel("t1")
    assert sorted(heard) == ["a", "b", "b"]
    await cancel("t3")  # nobody watches it
    assert len(heard) == 3


async def test_a_signal_is_remembered_for_a_while_in_bounded_memory(nc: Client) -> None:
    """A request queued behind another turn asks, when its turn comes, whether its client
    already gave up: nobody watched its subject when the signal came."""
    now = [0.0]
    signals = Signals(
        nc, SESSION_CANCEL_WILDCARD, remember=3, remember_seconds=60, clock=lambda: now[0]
    )
    await signals.start()
    for turn in ("t1", "t2", "t3", "t4"):
        await nc.publish(session_cancel("acme", "s1", turn), b"{}")
    await nc.flush()
    for _ in range(100):
        if signals.fired(session_cancel("acme", "s1", "t4")):
            break
        await asyncio.sleep(0.01)
    assert [signals.fired(session_cancel("acme", "s1", t)) for t in ("t1", "t2", "t3", "t4")] == [
        False,  # the oldest, dropped to stay within 3
        True,
        True,
        True,
    ]
    assert not signals.fired(session_cancel("acme", "s1", "never"))
    now[0] = 61.0
    assert not signals.fired(session_cancel("acme", "s1", "t4"))
