"""Reading a JetStream stream in order, in batches, from a given sequence on.

Projections (the memory index, `veil reindex`) read every event of the log. nats-py's
`next_msg` spends a task, a timer and a uuid on each message; here an ordered push
consumer hands messages to a callback that only appends them to a buffer, and the
reader takes them out a batch at a time. A full buffer holds the callback, the
subscription's queue then grows, and JetStream's flow control stops the server
from sending more: a reader that falls far behind (a rebuild of a long log) keeps a
bounded number of messages in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Self

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

__all__ = ["StreamReader"]


class StreamReader:
    """`async with StreamReader(js, subject, start_seq=n) as reader: await reader.next_batch()`."""

    def __init__(
        self,
        js: JetStreamContext,
        subject: str,
        *,
        start_seq: int = 1,
        batch: int = 256,
        wait: float = 0.05,
    ) -> None:
        self._js = js
        self._subject = subject
        self._start_seq = start_seq
        self.batch = batch
        # How long a batch may gather after its first message: fewer, larger index writes.
        self.wait = wait
        self._limit = 4 * batch
        self._inbox: deque[Msg] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._sub: JetStreamContext.PushSubscription | None = None

    @property
    def buffered(self) -> int:
        """Messages received and not yet taken."""
        return len(self._inbox)

    async def __aenter__(self) -> Self:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        if self._start_seq > 1:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self._start_seq
            )
        self._sub = await self._js.subscribe(
            self._subject, ordered_consumer=True, config=config, cb=self._deliver
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._room.set()  # a callback held by a full buffer must not outlive the subscription
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def next_batch(self, timeout: float | None = None) -> list[Msg]:
        """The next messages in stream order, at most `batch`; [] if none came within `timeout`."""
        if not self._inbox:
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            except TimeoutError:
                return []
        if len(self._inbox) < self.batch and self.wait > 0:
            await asyncio.sleep(self.wait)
        taken = [self._inbox.popleft() for _ in range(min(self.batch, len(self._inbox)))]
        if len(self._inbox) < self._limit:
            self._room.set()
        return taken

    async def _deliver(self, msg: Msg) -> None:
        self._inbox.append(msg)
        self._arrived.set()
        if len(self._inbox) >= self._limit:
            self._room.clear()
            await self._room.wait()
