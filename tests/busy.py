"""A busy event loop, for tests of work that gives way to it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

__all__ = ["busy_loop"]


@contextlib.asynccontextmanager
async def busy_loop() -> AsyncIterator[None]:
    """Keep the loop's thread on the CPU four fifths of the time, as a server under load.

    The pauses matter: a thread that never sleeps starves worker threads of the GIL.
    """
    stop = asyncio.Event()

    async def spin() -> None:
        while not stop.is_set():
            end = time.perf_counter() + 0.004
            while time.perf_counter() < end:
                pass
            await asyncio.sleep(0.001)

    task = asyncio.create_task(spin())
    try:
        yield
    finally:
        stop.set()
        await task
