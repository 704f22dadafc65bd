"""What idle, slow and piled-up connections may hold of the gateway.

aiohttp reads request headers for as long as a client cares to send them, and keeps
an idle connection for an hour; each one holds a file descriptor. A client that
opens connections and sends nothing, or a header byte every few seconds
(slowloris), exhausts the process's descriptors and every other request fails.

The guard wraps the server's protocol (plain asyncio: connection_made,
data_received, connection_lost, and flow control, forwarded) and tracks each
connection as idle (no request being handled) or busy. An idle connection is
closed when

- it has sent no complete request header within `header_timeout` of opening, or
  of the first byte of its next request;
- it has sat between requests for `keepalive_timeout` (nginx's 75 s by default).

Connections are capped per process and per client address. At a cap, a new
connection takes the place of the longest idle one (a half-sent request first),
so idle connections can never keep a real request out; only when every
connection is busy is the new one refused. Bodies are read under their own
timeout by the handlers (`read_body`).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, cast

import structlog
from aiohttp import web

__all__ = ["FD_RESERVE", "ConnectionGuard", "GuardedSite", "guard_middleware", "raise_fd_limit"]

log = structlog.get_logger("veil.gateway")

# Descriptors kept free for what is not a client connection (NATS, SQLite, models, logs).
FD_RESERVE = 512


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit where the OS allows; the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _Connection(asyncio.Protocol):
    """One client connection: forwards to aiohttp's protocol, tells the guard its state."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.admitted = False
        self.served = 0  # requests completed on it
        self.busy = 0  # requests being handled now
        self.partial = False  # bytes of a next request arrived, its handler not started yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio's classes: no isinstance here.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if not self._guard._admit(self):
            self.transport.abort()
            return
        self.admitted = True
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy and not self.partial:
            self._guard._started_request(self)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard._forget(self)
        if self.admitted:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class ConnectionGuard:
    """Connection caps, header and keep-alive timeouts for one HTTP server."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_per_client: int,
        header_timeout: float,
        keepalive_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self._clock = clock
        self._by_transport: dict[object, _Connection] = {}
        self._per_client: dict[str, int] = {}
        # Idle connections, oldest first, by what their deadline counts from: a request
        # begun (its first byte), a connection opened, the end of the last request.
        self._partial: OrderedDict[_Connection, float] = OrderedDict()
        self._fresh: OrderedDict[_Connection, float] = OrderedDict()
        self._waiting: OrderedDict[_Connection, float] = OrderedDict()
        self._sweeper: asyncio.Task[None] | None = None
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0

    @property
    def connections(self) -> int:
        return len(self._by_transport)

    def protocol_factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], _Connection]:
        return lambda: _Connection(self, inner())

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    @contextlib.contextmanager
    def serving(self, transport: object) -> Iterator[None]:
        """A request is being handled on this connection (its headers are complete)."""
        conn = self._by_transport.get(transport)
        if conn is None:
            yield
            return
        self._set_idle(conn, None)
        conn.busy += 1
        conn.partial = False
        try:
            yield
        finally:
            conn.busy -= 1
            conn.served += 1
            if conn.busy == 0 and self._by_transport.get(conn.transport) is conn:
                self._set_idle(conn, self._waiting)

    # -- bookkeeping ----------------------------------------------------------------------

    def _set_idle(self, conn: _Connection, where: OrderedDict[_Connection, float] | None) -> None:
        for table in (self._partial, self._fresh, self._waiting):
            table.pop(conn, None)
        if where is not None:
            where[conn] = self._clock()

    def _admit(self, conn: _Connection) -> bool:
        if self._per_client.get(conn.peer, 0) >= self.max_per_client and not self._evict(conn.peer):
            self.refused += 1
            return False
        if len(self._by_transport) >= self.max_connections and not self._evict(None):
            self.refused += 1
            return False
        self._by_transport[conn.transport] = conn
        self._per_client[conn.peer] = self._per_client.get(conn.peer, 0) + 1
        self._fresh[conn] = self._clock()
        return True

    def _started_request(self, conn: _Connection) -> None:
        conn.partial = True
        if conn in self._fresh:
            return  # the header timeout already counts from the connection's start
        self._set_idle(conn, self._partial)

    def _forget(self, conn: _Connection) -> None:
        if self._by_transport.pop(conn.transport, None) is None:
            return
        self._set_idle(conn, None)
        left = self._per_client.get(conn.peer, 1) - 1
        if left:
            self._per_client[conn.peer] = left
        else:
            self._per_client.pop(conn.peer, None)

    def _evict(self, peer: str | None) -> bool:
        """Close the longest idle connection (of `peer`, if given) to make room."""
        for table in (self._partial, self._fresh, self._waiting):
            victim = next((c for c in table if peer is None or c.peer == peer), None)
            if victim is not None:
                self._forget(victim)
                victim.close()
                self.evicted += 1
                return True
        return False

    # -- timeouts -------------------------------------------------------------------------

    def sweep(self) -> int:
        """Close idle connections past their deadline; how many."""
        now = self._clock()
        closed = 0
        for table, limit in (
            (self._partial, self.header_timeout),
            (self._fresh, self.header_timeout),
            (self._waiting, self.keepalive_timeout),
        ):
            while table:
                conn, since = next(iter(table.items()))
                if now - since < limit:
                    break
                self._forget(conn)
                conn.close()
                closed += 1
        self.timed_out += closed
        return closed

    async def _sweep_forever(self) -> None:
        interval = max(0.05, min(1.0, self.header_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            self.sweep()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections pass through a ConnectionGuard."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        *,
        # A flood opens connections faster than they are accepted: a short listen queue
        # overflows and new clients wait for SYN retries (1-2 s, bench/abuse.py flood).
        backlog: int = 4096,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, backlog=backlog, ssl_context=ssl_context)
        self._host = host
        self._port = port
        self.guard = guard

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        sockets = getattr(self._server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else self._port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.guard.protocol_factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
            ssl=self._ssl_context,
            # The guard sees a TLS connection only once its handshake is done: a client
            # that never finishes one gets the time it would have for its headers, not
            # asyncio's default of 60 s.
            ssl_handshake_timeout=self.guard.header_timeout if self._ssl_context else None,
        )
        self.guard.start()

    async def stop(self) -> None:
        await self.guard.stop()
        await super().stop()


def guard_middleware(guard: ConnectionGuard) -> Any:
    """Marks a connection busy while a handler serves a request on it."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        with guard.serving(request.transport):
            response: web.StreamResponse = await handler(request)
            return response

    return middleware
