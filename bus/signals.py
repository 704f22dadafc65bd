"""Rare signals for many waiters, over one wildcard subscription per connection.

A turn waits for its cancellation on a subject of its own. Subscribing for each
turn cost a SUB and an UNSUB on the wire and a reader task in nats-py, for a
message that almost never comes; one subscription to the wildcard, dispatched
here by subject, costs nothing per turn. Every worker then receives every
cancellation, which is fine for something that happens only when a client
hangs up.

Signals are also remembered for a while (bounded in count and age): a request
still queued behind another turn when its client gave up must not start once
its turn comes (`fired`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["REMEMBER_COUNT", "REMEMBER_SECONDS", "Signals"]

# How many fired subjects are remembered, and for how long: longer than a request
# may wait for its session (accept_timeout), bounded so a flood cannot grow it.
REMEMBER_COUNT = 20_000
REMEMBER_SECONDS = 3600.0


class Signals:
    def __init__(
        self,
        nc: Client,
        wildcard: str,
        *,
        remember: int = REMEMBER_COUNT,
        remember_seconds: float = REMEMBER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nc = nc
        self._wildcard = wildcard
        self._sub: Subscription | None = None
        self._watchers: dict[str, list[Callable[[], None]]] = {}
        self._fired: OrderedDict[str, float] = OrderedDict()
        self._remember = remember
        self._remember_seconds = remember_seconds
        self._clock = clock

    async def start(self) -> None:
        """Subscribe (once); `watch` does it too, but a worker does it before taking work."""
        if self._sub is None:
            self._sub = await self._nc.subscribe(self._wildcard, cb=self._dispatch)
            await self._nc.flush()

    async def watch(self, subject: str, on_signal: Callable[[], None]) -> Callable[[], None]:
        """Call `on_signal` whenever a message arrives on `subject`; returns the unwatch."""
        await self.start()
        self._watchers.setdefault(subject, []).append(on_signal)

        def unwatch() -> None:
            watchers = self._watchers.get(subject)
            if watchers is not None:
                watchers.remove(on_signal)
                if not watchers:
                    del self._watchers[subject]

        return unwatch

    def fired(self, subject: str) -> bool:
        """Whether a signal arrived on `subject` lately (whether or not anyone watched)."""
        at = self._fired.get(subject)
        return at is not None and self._clock() - at <= self._remember_seconds

    async def _dispatch(self, msg: Msg) -> None:
        self._fired[msg.subject] = self._clock()
        self._fired.move_to_end(msg.subject)
        while len(self._fired) > self._remember:
            self._fired.popitem(last=False)
        for on_signal in list(self._watchers.get(msg.subject, ())):
            on_signal()
