"""The actor runtime: activation, one mailbox per actor, passivation, supervision.

Requests arrive through a NATS micro service endpoint (so `$SRV.PING`,
`$SRV.INFO` and `$SRV.STATS` answer and `nats micro ls` lists the service).
The endpoint callback only routes: it puts the request into the mailbox of the
actor that owns the key and returns, so one slow actor never blocks the others
served by the same subscription.

A screen, when given, sees each request first, with the key's live actor if there
is one. It either admits the request to the mailbox at once (an Envelope carrying
what it made of the request), or takes it over as a task of its own: to answer
without queuing behind the actor's current work (reads), to refuse it without
activating an actor for a key that has no state, or to check something before
delivering it itself (`deliver`).

Bounds keep a burst from queueing without end (a request that waits longer than its
caller does is work for nobody). A host may bound the requests admitted to one key and
not yet answered (`max_queued` waiting behind the one running), and the requests admitted
to all its keys together (`max_in_flight`, running or waiting). Past a bound, `deliver`
raises Overloaded before anything reaches a mailbox, and the host hands the request to
`overloaded` to answer it (else a micro "503" error). Work a screen takes over without a
mailbox (reads) is not bounded. A refusal is final: a NATS micro service answers each
request once, and a request nobody answers is not redelivered to another member of the
queue group but times out, so a refusal says "try again" and the caller's retry lands on
whichever worker the queue group picks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Coroutine
from typing import Any, NamedTuple, Protocol

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service

from bus import telemetry

__all__ = ["Actor", "ActorHost", "Envelope", "Overloaded", "Screen"]

log = structlog.get_logger("veil.runtime")


class Envelope(NamedTuple):
    """A request in a mailbox, with what the screen made of it (None without a screen)."""

    request: Request
    message: Any = None


class Actor(Protocol):
    async def receive(self, envelope: Envelope) -> None:
        """Handle one request; replies go through envelope.request.respond()."""
        ...

    async def stop(self) -> None:
        """Called once on passivation or shutdown."""
        ...


class Overloaded(Exception):
    """A bound refused a request: its key's mailbox is full ("mailbox"), or the host has
    as many requests in flight as it takes ("in_flight")."""

    def __init__(self, bound: str, limit: int) -> None:
        super().__init__(f"{bound} bound of {limit} reached")
        self.bound = bound
        self.limit = limit


class _Cell:
    """One live actor: its mailbox and the task draining it."""

    __slots__ = ("actor", "mailbox", "pending", "task")

    def __init__(self, actor: Actor) -> None:
        self.actor = actor
        # None is the stop signal, queued behind the requests already in.
        self.mailbox: asyncio.Queue[Envelope | None] = asyncio.Queue()
        # Requests delivered and not yet handled: the mailbox's and the one running.
        # Counted, not read from the queue: a request just taken out still runs.
        self.pending = 0
        self.task: asyncio.Task[None] | None = None


# Admit now (an Envelope), or handle the request in a task of the screen's own.
Screen = Callable[[str, Request, Actor | None], Envelope | Coroutine[Any, Any, None]]
# Answers a request that a bound refused.
OnOverload = Callable[[Request, Overloaded], Coroutine[Any, Any, None]]


class ActorHost:
    """Hosts actors of one kind behind one micro service endpoint."""

    def __init__(
        self,
        nc: Client,
        *,
        service: str,
        version: str,
        description: str,
        endpoint: str,
        subject: str,
        key_of: Callable[[str], str],
        factory: Callable[[str], Actor],
        idle_seconds: float = 300.0,
        queue_group: str = "q",
        screen: Screen | None = None,
        max_queued: int | None = None,
        max_in_flight: int | None = None,
        overloaded: OnOverload | None = None,
    ) -> None:
        self._nc = nc
        self._service_name = service
        self._version = version
        self._description = description
        self._endpoint = endpoint
        self._subject = subject
        self._key_of = key_of
        self._factory = factory
        self._idle = idle_seconds
        self._queue_group = queue_group
        self._screen = screen
        self._max_queued = max_queued
        self._max_in_flight = max_in_flight
        self._overloaded = overloaded
        self._in_flight = 0
        self._cells: dict[str, _Cell] = {}
        self._screening: set[asyncio.Task[None]] = set()
        self._service: Service | None = None
        # Subjects served besides the endpoint's (serve_placed): placement's partitions,
        # and the requests they brought (in `nats micro stats`, the endpoint's data).
        self._also: dict[str, Subscription] = {}
        self._placed_requests = 0
        self._stopping = False

    @property
    def active(self) -> int:
        return len(self._cells)

    @property
    def in_flight(self) -> int:
        """Requests delivered to mailboxes and not yet handled, running ones included."""
        return self._in_flight

    def mailbox_depths(self) -> tuple[int, int]:
        """Requests waiting in all mailboxes together, and in the fullest one (read when
        metrics are scraped: nothing is counted per message)."""
        total = deepest = 0
        for cell in list(self._cells.values()):
            depth = cell.mailbox.qsize()
            total += depth
            deepest = max(deepest, depth)
        return total, deepest

    async def start(self) -> None:
        self._service = await add_service(
            self._nc,
            name=self._service_name,
            version=self._version,
            description=self._description,
            queue_group=self._queue_group,
            stats_handler=self._placed_stats,
        )
        await self._service.add_endpoint(
            name=self._endpoint, subject=self._subject, handler=self._route
        )

    async def serve_placed(self, subjects: Collection[str]) -> None:
        """Serve exactly these subjects besides the endpoint's, in the same queue group
        and through the same routing (bus/placement.py's partitions). Subjects dropped
        are drained: requests already delivered to this host still reach their actors.
        `nats micro stats` counts their requests in the endpoint's data."""
        wanted = set(subjects)
        for subject in [s for s in self._also if s not in wanted]:
            await _let_go(self._nc, self._also.pop(subject))
        for subject in sorted(wanted - self._also.keys()):
            if self._stopping:
                return
            self._also[subject] = await self._nc.subscribe(
                subject, queue=self._queue_group, cb=self._route_msg
            )

    async def _route_msg(self, msg: Msg) -> None:
        self._placed_requests += 1
        await self._route(Request(msg))

    def _placed_stats(self, _: EndpointStats) -> dict[str, int]:
        return {"placed_requests": self._placed_requests, "placed_subjects": len(self._also)}

    def actor(self, key: str) -> Actor | None:
        """The key's live actor, if one is active."""
        cell = self._cells.get(key)
        return cell.actor if cell is not None else None

    def check(self, key: str) -> None:
        """Raise Overloaded if a request for `key` would be refused now (a screen asks
        before it spends I/O on a request that `deliver` would refuse anyway)."""
        if self._max_in_flight is not None and self._in_flight >= self._max_in_flight:
            raise Overloaded("in_flight", self._max_in_flight)
        cell = self._cells.get(key)
        if (
            self._max_queued is not None
            and cell is not None
            and cell.pending > self._max_queued  # the one running and max_queued waiting
        ):
            raise Overloaded("mailbox", self._max_queued)

    def deliver(self, key: str, envelope: Envelope, *, bounded: bool = True) -> None:
        """Into the key's mailbox, activating its actor if needed; past a bound (unless
        `bounded` is False: work that must not be refused) it raises Overloaded."""
        if bounded:
            self.check(key)
        cell = self._cells.get(key)
        if cell is None:
            cell = _Cell(self._factory(key))
            self._cells[key] = cell
            cell.task = asyncio.create_task(self._run(key, cell), name=f"actor:{key}")
        cell.pending += 1
        self._in_flight += 1
        cell.mailbox.put_nowait(envelope)

    def _done(self, cell: _Cell) -> None:
        cell.pending -= 1
        self._in_flight -= 1

    async def _route(self, request: Request) -> None:
        try:
            key = self._key_of(request.subject)
        except ValueError as error:
            await request.respond_error("400", str(error))
            return
        if self._screen is None:
            admitted: Envelope | Coroutine[Any, Any, None] = Envelope(request)
        else:
            admitted = self._screen(key, request, self.actor(key))
        if isinstance(admitted, Envelope):
            try:
                self.deliver(key, admitted)
                return
            except Overloaded as refusal:
                admitted = self._refuse(request, refusal)
        task = asyncio.create_task(self._screened(request, admitted), name=f"screen:{key}")
        self._screening.add(task)
        task.add_done_callback(self._screening.discard)

    def _refuse(self, request: Request, refusal: Overloaded) -> Coroutine[Any, Any, None]:
        if self._overloaded is not None:
            return self._overloaded(request, refusal)
        return request.respond_error("503", str(refusal))

    async def _screened(self, request: Request, work: Coroutine[Any, Any, None]) -> None:
        headers = request.headers
        try:
            # The caller's request id and trace: what the screen asks of the bus carries them.
            with telemetry.serving(telemetry.request_id(headers), telemetry.incoming(headers)):
                await work
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.exception("actor.screen_failed", subject=request.subject, error=repr(error))
            with contextlib.suppress(Exception):
                await request.respond_error("500", f"request failed: {error!r}")

    async def _run(self, key: str, cell: _Cell) -> None:
        try:
            while True:
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for makes a
                    # task for every message.
                    async with asyncio.timeout(self._idle):
                        envelope = await cell.mailbox.get()
                except TimeoutError:
                    if cell.mailbox.empty():
                        return  # passivate; a new request activates a fresh actor
                    continue
                if envelope is None:
                    return
                try:
                    await cell.actor.receive(envelope)
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    # Supervision: restart from the log. The request that
                    # broke it gets an error reply; the next one finds a new actor.
                    log.exception("actor.crashed", actor=key, error=repr(error))
                    with contextlib.suppress(Exception):
                        await envelope.request.respond_error("500", f"actor failed: {error!r}")
                    with contextlib.suppress(Exception):
                        await cell.actor.stop()
                    cell.actor = self._factory(key)
                finally:
                    self._done(cell)
        finally:
            if self._cells.get(key) is cell:
                del self._cells[key]
            with contextlib.suppress(Exception):
                await cell.actor.stop()
            # Anything that raced into the mailbox after the idle check goes to a new actor
            # (admitted already: no bound refuses it now).
            while not cell.mailbox.empty():
                leftover = cell.mailbox.get_nowait()
                if leftover is not None:
                    self._done(cell)
                    if not self._stopping:
                        self.deliver(key, leftover, bounded=False)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking requests, let running actors finish, then cancel stragglers."""
        self._stopping = True
        await self.serve_placed(())
        if self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.stop()
        for task in list(self._screening):
            task.cancel()
        tasks = [c.task for c in self._cells.values() if c.task is not None]
        for cell in self._cells.values():
            cell.mailbox.put_nowait(None)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


async def _let_go(nc: Client, sub: Subscription) -> None:
    """Stop a subscription: with the bus there, a drain, so the requests it was already
    sent still reach their actors; without it at once (a drain's round trip would wait,
    and nothing is in flight). A drain that times out leaves at worst a subscription
    that goes on serving: a partition served twice is safe (bus/placement.py)."""
    with contextlib.suppress(Exception):
        if nc.is_connected:
            async with asyncio.timeout(2):
                await sub.drain()  # type: ignore[no-untyped-call]  # nats-py has no hints here
        else:
            await sub.unsubscribe()
