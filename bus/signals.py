"""Rare signals for many waiters, over one wildcard subscription per connection.

A turn waits for its cancellation on a subject of its own. Subscribing for each
turn cost a SUB and an UNSUB on the wire and a reader task in nats-py, for a
message that almost never comes; one subscription to the wildcard, dispatched
here by subject, costs nothing per turn. Every worker then receives every
cancellation, which is fine for something that happens only when a client
hangs up.
"""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["Signals"]


class Signals:
    def __init__(self, nc: Client, wildcard: str) -> None:
        self._nc = nc
        self._wildcard = wildcard
        self._sub: Subscription | None = None
        self._watchers: dict[str, list[Callable[[], None]]] = {}

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

    async def _dispatch(self, msg: Msg) -> None:
        for on_signal in list(self._watchers.get(msg.subject, ())):
            on_signal()
