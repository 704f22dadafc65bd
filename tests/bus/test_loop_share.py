"""Background work gives way while the event loop's thread is busy, within a bound."""

from __future__ import annotations

import asyncio

from bus.loop_share import LoopShare, give_way
from tests.busy import busy_loop


async def test_a_sleeping_loop_is_not_busy_and_a_spinning_one_is() -> None:
    share = LoopShare()
    await asyncio.sleep(0.1)
    assert share.share() < 0.3
    assert not await share.busy()
    async with busy_loop():
        share.reset()
        await asyncio.sleep(0.1)
        assert share.share() > 0.7
        assert await share.busy()


async def test_a_worker_thread_does_not_count() -> None:
    share = LoopShare()
    # CPU work on another thread (as embedding and SQLite run) leaves the loop free.
    await asyncio.to_thread(lambda: sum(i * i for i in range(3_000_000)))
    assert share.share() < 0.3


async def test_give_way_returns_at_once_on_a_quiet_loop() -> None:
    share = LoopShare()
    await asyncio.sleep(0.05)
    waited = await give_way(share, 5.0)
    assert waited < 0.3


async def test_give_way_waits_until_the_loop_quiets_down() -> None:
    share = LoopShare()
    async with busy_loop():
        waiting = asyncio.create_task(give_way(share, 10.0))
        await asyncio.sleep(0.5)
        assert not waiting.done()
    waited = await asyncio.wait_for(waiting, 2.0)
    assert 0.4 < waited < 2.0


async def test_give_way_stops_waiting_at_its_bound() -> None:
    share = LoopShare()
    async with busy_loop():
        waited = await asyncio.wait_for(give_way(share, 0.4), 3.0)
    assert 0.35 < waited < 1.0
