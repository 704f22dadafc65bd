"""The connection guard: idle and slow connections cannot keep a real request out."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from edge.http_guard import ConnectionGuard, GuardedSite, guard_middleware


class _FakeTransport:
    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.closed = False

    def get_extra_info(self, name: str) -> object:
        return (self.peer, 1234) if name == "peername" else None

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class _Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def _guard(now: list[float], **limits: float) -> ConnectionGuard:
    settings = {
        "max_connections": 4,
        "max_per_client": 3,
        "header_timeout": 10.0,
        "keepalive_timeout": 75.0,
        **limits,
    }
    return ConnectionGuard(
        max_connections=int(settings["max_connections"]),
        max_per_client=int(settings["max_per_client"]),
        header_timeout=settings["header_timeout"],
        keepalive_timeout=settings["keepalive_timeout"],
        clock=lambda: now[0],
    )


def _open(guard: ConnectionGuard, peer: str = "10.0.0.1") -> tuple[object, _FakeTransport]:
    conn = guard.protocol_factory(_Inner)()
    transport = _FakeTransport(peer)
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def test_connections_that_send_no_request_are_closed_after_the_header_timeout() -> None:
    now = [0.0]
    guard = _guard(now)
    _, silent = _open(guard)
    conn, trickling = _open(guard, "10.0.0.2")
    now[0] = 9.0
    conn.data_received(b"GET / HT")  # type: ignore[attr-defined]
    assert guard.sweep() == 0
    now[0] = 10.5  # both counted from the connection's start
    assert guard.sweep() == 2 and silent.closed and trickling.closed
    assert guard.connections == 0


def test_between_requests_a_connection_may_idle_for_the_keepalive_timeout() -> None:
    now = [0.0]
    guard = _guard(now)
    conn, transport = _open(guard)
    with guard.serving(transport):
        now[0] = 500.0  # a long turn: a busy connection has no deadline
        assert guard.sweep() == 0
    now[0] = 560.0
    assert guard.sweep() == 0  # idle 60 s of 75
    conn.data_received(b"POST /v1/chat")  # type: ignore[attr-defined]
    now[0] = 569.0
    assert guard.sweep() == 0
    now[0] = 571.0  # the next request's headers took more than 10 s
    assert guard.sweep() == 1 and transport.closed


def test_at_the_cap_a_new_connection_replaces_the_longest_idle_one() -> None:
    now = [0.0]
    guard = _guard(now, max_connections=3, max_per_client=10)
    busy = [_open(guard, f"10.0.1.{i}")[1] for i in range(2)]
    serving = [guard.serving(transport) for transport in busy]  # held: still running
    for request in serving:
        request.__enter__()
    now[0] = 1.0
    _, idle = _open(guard, "10.0.2.1")
    now[0] = 2.0
    _, newcomer = _open(guard, "10.0.3.1")
    assert idle.closed and not newcomer.closed and not any(t.closed for t in busy)
    assert guard.evicted == 1 and guard.connections == 3
    # All busy: now a newcomer is refused, nobody is cut off mid-request.
    serving.append(guard.serving(newcomer))
    serving[-1].__enter__()
    _, refused = _open(guard, "10.0.4.1")
    assert refused.closed and guard.refused == 1 and guard.connections == 3


def test_one_client_address_cannot_take_every_slot() -> None:
    now = [0.0]
    guard = _guard(now, max_connections=100, max_per_client=3)
    flood = [_open(guard, "10.9.9.9")[1] for _ in range(3)]
    _, fourth = _open(guard, "10.9.9.9")
    assert flood[0].closed and not fourth.closed  # its own oldest idle one made room
    _, other = _open(guard, "10.0.0.1")
    assert not other.closed and guard.connections == 4


@pytest.fixture
async def guarded_server() -> AsyncIterator[tuple[int, ConnectionGuard]]:
    guard = ConnectionGuard(
        max_connections=20, max_per_client=20, header_timeout=0.5, keepalive_timeout=5.0
    )

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application(middlewares=[guard_middleware(guard)])
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = GuardedSite(runner, "127.0.0.1", 0, guard)
    await site.start()
    yield site.port, guard
    await runner.cleanup()


async def test_a_flood_of_idle_and_trickling_connections_does_not_keep_a_request_out(
    guarded_server: tuple[int, ConnectionGuard],
) -> None:
    port, guard = guarded_server
    loop = asyncio.get_running_loop()
    idle: list[socket.socket] = []
    for i in range(60):  # three times the cap; half of them send a header byte
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        if i % 2:
            sock.send(b"G")
        idle.append(sock)
    await asyncio.sleep(0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 30)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello")
    writer.close()
    assert guard.evicted > 0 and guard.connections <= 20
    # Past the header timeout, the survivors are closed by the server: they read EOF.
    for sock in idle:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 16), 30)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        assert data == b""
        sock.close()
    assert guard.connections == 0
