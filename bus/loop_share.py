"""Background work that gives way to the event loop's foreground work.

The memory projection embeds and indexes every message of the log. Run at once,
its share of the event loop's thread (reading the log, decoding, handing rows to
the index) slows every turn of a burst that is still running. Waiting while the
loop's thread is busy, for at most a bounded time, lets the burst go at full
speed and the index catch up after it; under load that never eases, the bound
makes the work go ahead anyway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["BUSY_SHARE", "LoopShare", "give_way"]

# The loop's thread is busy when it spent this share of wall time on the CPU.
BUSY_SHARE = 0.4
# A share is measured over at least WINDOW and at most LOOKBACK seconds; a
# waiting task looks again every POLL seconds.
WINDOW = 0.02
LOOKBACK = 1.0
POLL = 0.05


class LoopShare:
    """The share of wall time the event loop's thread spent on the CPU since `reset`.

    Every call must come from the loop's thread (from coroutines): the CPU time is
    that thread's own, so worker threads (embedding, SQLite) do not count.
    """

    def __init__(
        self,
        *,
        cpu: Callable[[], float] = time.thread_time,
        wall: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        # Injectable, so that tests drive time and load instead of measuring them.
        self.cpu = cpu
        self.wall = wall
        self.sleep = sleep
        self.reset()

    def reset(self) -> None:
        self._cpu = self.cpu()
        self._wall = self.wall()

    def share(self) -> float:
        wall = self.wall() - self._wall
        return (self.cpu() - self._cpu) / wall if wall > 0 else 0.0

    async def busy(self, threshold: float = BUSY_SHARE) -> bool:
        """Whether the thread was busy lately: over the time since `reset`, waiting until
        that is WINDOW long; a quiet stretch longer than LOOKBACK starts afresh."""
        wall = self.wall() - self._wall
        if wall > LOOKBACK:
            self.reset()  # a long quiet past says nothing of the present
            wall = 0.0
        if wall < WINDOW:
            await self.sleep(WINDOW - wall)
        return self.share() >= threshold


async def give_way(load: LoopShare, within: float) -> float:
    """Wait while the loop's thread stays busy, for at most `within` seconds; returns the wait."""
    started = load.wall()
    deadline = started + within
    while True:
        now = load.wall()
        if now >= deadline:
            return now - started
        load.reset()
        await load.sleep(min(POLL, deadline - now))
        if not await load.busy():
            return load.wall() - started
