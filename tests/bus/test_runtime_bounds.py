"""The actor runtime's bounds: a key's mailbox and the host's requests in flight.

Past a bound a request is refused at once and never reaches a mailbox; what was
admitted still runs, in order; a bound frees as requests finish; work a screen takes
over (reads) is not bounded. The actors wait on an event the test sets, so "while
the mailbox is full" is a fact, not a timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro.request import Request

from bus.runtime import Actor, ActorHost, Envelope, Overloaded

# Hang detectors only: every wait ends on an event long before this.
PATIENCE = 10.0


class Gated:
    """Answers each request with its payload once `release` is set, noting the order."""

    def __init__(self, release: asyncio.Event, seen: list[bytes]) -> None:
        self._release = release
        self._seen = seen

    async def receive(self, envelope: Envelope) -> None:
        await self._release.wait()
        self._seen.append(envelope.request.data)
        await envelope.request.respond(envelope.request.data)

    async def stop(self) -> None:
        pass


class Replies:
    """Replies to numbered requests, gathered on one inbox subscription."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self.got: dict[int, Msg] = {}
        self._inbox = nc.new_inbox()
        self._arrived = asyncio.Event()

    async def start(self) -> None:
        async def on_reply(msg: Msg) -> None:
            self.got[int(msg.subject.rsplit(".", 1)[1])] = msg
            self._arrived.set()

        await self._nc.subscribe(f"{self._inbox}.*", cb=on_reply)
        await self._nc.flush()

    async def send(self, subject: str, n: int, data: bytes) -> None:
        # One connection, published in turn: the host sees them in this order.
        await self._nc.publish(subject, data, reply=f"{self._inbox}.{n}")
        await self._nc.flush()

    async def wait_for(self, *numbers: int) -> None:
        async with asyncio.timeout(PATIENCE):
            while not all(n in self.got for n in numbers):
                self._arrived.clear()
                await self._arrived.wait()


def _refused(msg: Msg) -> bool:
    return bool(msg.headers and msg.headers.get("Nats-Service-Error-Code") == "503")


async def _until(condition: Any) -> None:
    async with asyncio.timeout(PATIENCE):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_full_mailbox_refuses_at_once_and_the_admitted_run_in_order(
    nc: Client,
) -> None:
    release, seen = asyncio.Event(), list[bytes]()
    host = ActorHost(
        nc,
        service="bounds-mailbox",
        version="0.0.1",
        description="a gated actor",
        endpoint="work",
        subject="bounds.mailbox.*",
        key_of=lambda subject: subject.rsplit(".", 1)[1],
        factory=lambda _key: Gated(release, seen),
        max_queued=2,
    )
    await host.start()
    await nc.flush()
    replies = Replies(nc)
    await replies.start()
    try:
        for n in range(6):
            await replies.send("bounds.mailbox.a", n, str(n).encode())
        # One running and two waiting are admitted; the other three are refused before
        # anything of theirs runs (the actor is still held).
        await replies.wait_for(3, 4, 5)
        assert all(_refused(replies.got[n]) for n in (3, 4, 5))
        assert replies.got[3].headers is not None
        assert "mailbox bound of 2" in replies.got[3].headers["Nats-Service-Error"]
        assert seen == [] and host.in_flight == 3
        # Another key has a mailbox of its own.
        await replies.send("bounds.mailbox.b", 6, b"6")
        await _until(lambda: host.in_flight == 4)
        release.set()
        await replies.wait_for(0, 1, 2, 6)
        assert [replies.got[n].data for n in (0, 1, 2, 6)] == [b"0", b"1", b"2", b"6"]
        assert not any(_refused(replies.got[n]) for n in (0, 1, 2, 6))
        assert [s for s in seen if s != b"6"] == [b"0", b"1", b"2"]  # in order, only those
        await _until(lambda: host.in_flight == 0)
        # The bound frees as requests finish.
        await replies.send("bounds.mailbox.a", 7, b"7")
        await replies.wait_for(7)
        assert replies.got[7].data == b"7"
    finally:
        release.set()
        await host.stop()


async def test_the_in_flight_bound_spans_keys_and_spares_what_the_screen_takes_over(
    nc: Client,
) -> None:
    release, seen = asyncio.Event(), list[bytes]()
    refusals: list[tuple[bytes, str, int]] = []

    async def overloaded(request: Request, refusal: Overloaded) -> None:
        refusals.append((request.data, refusal.bound, refusal.limit))
        await request.respond(b"busy")

    async def read(request: Request) -> None:
        await request.respond(b"read")

    async def unbounded(key: str, request: Request) -> None:
        host.deliver(key, Envelope(request), bounded=False)  # work that ends work (a deletion)

    def screen(
        key: str, request: Request, _actor: Actor | None
    ) -> Envelope | Coroutine[Any, Any, None]:
        if request.data == b"read":
            return read(request)
        if request.data == b"delete":
            return unbounded(key, request)
        return Envelope(request)

    host = ActorHost(
        nc,
        service="bounds-flight",
        version="0.0.1",
        description="a gated actor",
        endpoint="work",
        subject="bounds.flight.*",
        key_of=lambda subject: subject.rsplit(".", 1)[1],
        factory=lambda _key: Gated(release, seen),
        screen=screen,
        max_queued=8,
        max_in_flight=3,
        overloaded=overloaded,
    )
    await host.start()
    await nc.flush()
    replies = Replies(nc)
    await replies.start()
    try:
        for n, key in enumerate("abc"):
            await replies.send(f"bounds.flight.{key}", n, key.encode())
        await _until(lambda: host.in_flight == 3)
        # A fourth key and a request behind a running one: both past the host's bound.
        await replies.send("bounds.flight.d", 3, b"d")
        await replies.send("bounds.flight.a", 4, b"a2")
        # A read the screen answers itself is served all the same.
        await replies.send("bounds.flight.a", 5, b"read")
        await replies.wait_for(3, 4, 5)
        assert [replies.got[n].data for n in (3, 4, 5)] == [b"busy", b"busy", b"read"]
        assert refusals == [(b"d", "in_flight", 3), (b"a2", "in_flight", 3)]
        assert seen == [] and host.active == 3  # no actor was activated for d
        # What the screen delivers unbounded goes in past the bound.
        await replies.send("bounds.flight.b", 7, b"delete")
        await _until(lambda: host.in_flight == 4)
        release.set()
        await replies.wait_for(0, 1, 2, 7)
        assert sorted(replies.got[n].data for n in (0, 1, 2)) == [b"a", b"b", b"c"]
        assert replies.got[7].data == b"delete"
        await _until(lambda: host.in_flight == 0)
        await replies.send("bounds.flight.d", 6, b"d")
        await replies.wait_for(6)
        assert replies.got[6].data == b"d"
    finally:
        release.set()
        await host.stop()
