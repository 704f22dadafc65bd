"""A 3-node NATS JetStream cluster on loopback (plain TCP), and a TCP proxy that can cut
a client off from it: the ground that tests/test_faults.py and bench/faults.py break.

TLS and per-role users are tests/test_cluster.py's subject; here the nodes only route to
each other. `no_advertise` keeps the nodes from telling clients the others' addresses, so a
client behind a `CutProxy` reconnects through the proxy, never around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import sys
import threading
import time
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from testkit.procs import Child

__all__ = ["CutProxy", "NatsCluster", "free_ports"]


def free_ports(count: int) -> list[int]:
    """Ports free on loopback now (held together, so they differ)."""
    held = [socket.socket() for _ in range(count)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _conf(name: str, port: int, route_port: int, routes: list[int], store: Path) -> str:
    return f"""
server_name: {name}
listen: 127.0.0.1:{port}
max_payload: 8MB
jetstream {{
  store_dir: "{store}"
  max_memory_store: 256MB
  max_file_store: 4GB
}}
cluster {{
  name: veil-faults
  listen: 127.0.0.1:{route_port}
  no_advertise: true
  routes: [{", ".join(f"nats://127.0.0.1:{p}" for p in routes)}]
}}
"""


class NatsCluster:
    """Three nats-servers from the wheel; a node can be killed and started again on its
    own ports and store, as a restarted machine would come back."""

    def __init__(self, where: Path, size: int = 3) -> None:
        ports = free_ports(2 * size)
        self.ports, self.route_ports = ports[:size], ports[size:]
        self.where = where
        self.nodes: list[Child | None] = [None] * size
        for i in range(size):
            others = [p for j, p in enumerate(self.route_ports) if j != i]
            conf = _conf(self.name(i), self.ports[i], self.route_ports[i], others, where / f"n{i}")
            (where / f"n{i}.conf").write_text(conf)

    @staticmethod
    def name(i: int) -> str:
        return f"nats-{i + 1}"

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.ports]

    def start_node(self, i: int) -> None:
        binary = str(Path(sys.executable).parent / "nats-server")
        node = Child([binary, "-c", str(self.where / f"n{i}.conf")], name=self.name(i))
        self.nodes[i] = node
        node.wait_for("Server is ready", timeout=30)

    def kill_node(self, i: int) -> None:
        node, self.nodes[i] = self.nodes[i], None
        if node is not None:
            node.kill()

    def start(self) -> None:
        for i in range(len(self.nodes)):
            self.start_node(i)

    def stop(self) -> None:
        for i, node in enumerate(self.nodes):
            if node is not None:
                node.stop(timeout=10)
                self.nodes[i] = None

    async def connect(self) -> Client:
        return await nats.connect(self.urls, connect_timeout=5, max_reconnect_attempts=-1)

    async def wait_until_healthy(self, timeout: float = 60) -> None:
        """Until JetStream has a leader and every stream has all its replicas current (a
        node just started has caught up): the cluster can lose a node again."""
        nc = await self.connect()
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + timeout
            while True:
                problem = await _replica_problem(js)
                if problem is None:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"the cluster did not heal in {timeout:.0f} s: {problem}")
                await asyncio.sleep(0.2)
        finally:
            await nc.close()

    async def leader_of(self, stream: str) -> int:
        """The index of the node leading `stream`."""
        nc = await self.connect()
        try:
            info = await nc.jetstream().stream_info(stream)
            assert info.cluster is not None and info.cluster.leader is not None
            return int(info.cluster.leader.removeprefix("nats-")) - 1
        finally:
            await nc.close()


async def _replica_problem(js: nats.js.JetStreamContext) -> str | None:
    try:
        await js.account_info()
        streams = await js.streams_info()
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as error:
        return repr(error)
    for info in streams:
        cluster = info.cluster
        if cluster is None or cluster.leader is None:
            return f"{info.config.name}: no leader"
        for peer in cluster.replicas or []:
            if not peer.current or peer.offline:
                return f"{info.config.name}: {peer.name} not current"
    return None


class CutProxy:
    """A TCP proxy in a thread of its own, one listener per target port. `cut(seconds)`
    closes every connection through it and refuses new ones (accepted, then closed) for
    that long: a process behind it loses the bus, while everything else keeps it."""

    def __init__(self, targets: list[int]) -> None:
        self.targets = targets
        self.ports: list[int] = []
        self.cuts = 0
        self._until = 0.0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._servers: list[asyncio.Server] = []

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.ports]

    def start(self) -> CutProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    async def _listen(self) -> None:
        for target in self.targets:
            server = await asyncio.start_server(
                functools.partial(self._serve, target=target), "127.0.0.1", 0
            )
            self._servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])

    @property
    def is_cut(self) -> bool:
        return time.monotonic() < self._until

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: int
    ) -> None:
        if self.is_cut:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()  # the node is down: as if the client had tried it directly
            return
        pair = {writer, up_writer}
        self._writers |= pair
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            self._writers -= pair
            for w in pair:
                w.close()

    def cut(self, seconds: float) -> None:
        """Close every connection now and refuse new ones for `seconds`."""

        def close_all() -> None:
            self._until = time.monotonic() + seconds
            self.cuts += 1
            for w in list(self._writers):
                w.transport.abort()  # no FIN handshake: like a pulled cable, at once

        self._loop.call_soon_threadsafe(close_all)

    def stop(self) -> None:
        async def close() -> None:
            for server in self._servers:
                server.close()
            for w in list(self._writers):
                w.transport.abort()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()
