"""Background work gives way while the event loop's thread is busy, within a bound.

Time and the loop's load are driven by a fake clock: the logic is tested, not the
machine's speed.
"""

from __future__ import annotations

import asyncio

import pytest

from bus.loop_share import LOOKBACK, POLL, WINDOW, LoopShare, give_way


class Clock:
    """Wall time that advances only when slept, and the loop's CPU time at `load` of it."""

    def __init__(self, load: float = 0.0) -> None:
        self.now = 1000.0
        self.cpu_time = 0.0
        self.load = load
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        self.cpu_time += seconds * self.load
        await asyncio.sleep(0)

    def share(self) -> LoopShare:
        return LoopShare(cpu=lambda: self.cpu_time, wall=lambda: self.now, sleep=self.sleep)


async def test_busy_is_the_loop_threads_share_of_wall_time_over_a_window() -> None:
    clock = Clock(load=0.1)
    share = clock.share()
    assert not await share.busy()
    assert clock.slept == [WINDOW]  # it waited for a window to measure over
    clock.load = 0.8
    share.reset()
    assert await share.busy()
    assert share.share() == pytest.approx(0.8)
    # A quiet past longer than the lookback says nothing of the present: measured afresh.
    clock.load = 0.0
    clock.now += LOOKBACK + 1
    assert not await share.busy()


async def test_give_way_returns_at_once_on_a_quiet_loop() -> None:
    clock = Clock(load=0.0)
    waited = await give_way(clock.share(), 5.0)
    assert waited == pytest.approx(POLL)  # one look, and it is quiet


async def test_give_way_waits_until_the_loop_quiets_down() -> None:
    clock = Clock(load=1.0)
    share = clock.share()

    async def quiet_later() -> None:
        while clock.now < 1002.0:
            await asyncio.sleep(0)
        clock.load = 0.0

    quieting = asyncio.create_task(quiet_later())
    waited = await give_way(share, 10.0)
    await quieting
    assert 2.0 <= waited < 2.0 + 2 * (POLL + WINDOW)  # fake seconds: exact up to one poll


async def test_give_way_stops_waiting_at_its_bound() -> None:
    clock = Clock(load=1.0)
    waited = await give_way(clock.share(), 0.4)
    assert 0.4 - 1e-9 <= waited <= 0.4 + WINDOW  # its last look may take one window more


async def test_a_worker_thread_does_not_count() -> None:
    """The real clocks: CPU work on another thread (embedding, SQLite) leaves the loop's
    thread idle. No share of the machine is assumed: the loop thread only waits here."""
    share = LoopShare()
    await asyncio.to_thread(lambda: sum(i * i for i in range(3_000_000)))
    assert share.share() < 0.3
