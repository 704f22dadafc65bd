"""Run Veil (workers + gateway) in a background thread with its own event loop.

Tests then talk to it over real HTTP with the official SDKs, sync or async,
while the test's own loop stays free.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

import aiohttp
import nats
from aiohttp import web

from config import Config
from eventstore.jetstream import JetStreamEventStore
from veil.server import serve_gateway
from veil.telemetry import new_registry
from veil.workers import Workers

T = TypeVar("T")


class VeilThread:
    def __init__(self, config: Config, nats_url: str) -> None:
        if config.data_dir == Config().data_dir:
            # Never the repository's ./.veil: each instance gets its own memory index.
            config.data_dir = tempfile.mkdtemp(prefix="veil-test-")
        self.config = config
        self.nats_url = nats_url
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="veil", daemon=True)
        self._workers: Workers | None = None
        self._runner: web.AppRunner | None = None
        # One metrics registry for the instance, as a `veil serve` process has.
        self.registry = new_registry()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def workers(self) -> Workers:
        assert self._workers is not None
        return self._workers

    def wait_for_memory(self, timeout: float = 30) -> None:
        """Block until the memory projection has applied everything in the log."""

        async def caught_up() -> None:
            memory = self.workers.memory
            assert memory is not None, "no memory actor runs in this instance"
            js = self.workers.nc.jetstream()
            last = (await js.stream_info("CHAT_EVENTS")).state.last_seq
            while await memory.index.checkpoint() < last:
                await asyncio.sleep(0.02)

        self.call(caught_up(), timeout)

    def events(self, session_id: str, tenant: str | None = None) -> list[Any]:
        """A session's events as its log holds them, read through a connection of its own;
        without a tenant, of the one tenant that has a session of this id (if any)."""

        async def read() -> list[Any]:
            nc = await nats.connect(self.nats_url)
            try:
                store = JetStreamEventStore(nc.jetstream(), nc)
                tenants = [tenant] if tenant else await store.tenants_of(session_id)
                assert len(tenants) <= 1, f"several tenants use {session_id}: name one"
                return [s.event for t in tenants for s in await store.load(t, session_id)]
            finally:
                await nc.close()

        return self.call(read())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on Veil's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        self._workers = Workers(self.config, self.nats_url, self.registry)
        await self._workers.start()
        self._runner, self.port = await serve_gateway(
            self.config, self.nats_url, "127.0.0.1", 0, self.registry
        )

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._workers is not None:
            await self._workers.stop()

    def start(self) -> VeilThread:
        self._thread.start()
        try:
            self.call(self._start())
        except BaseException:
            # A start that failed half-way stops what it started: no worker stays behind
            # to answer a later module's commands.
            with contextlib.suppress(Exception):
                self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._loop.is_closed():
            return  # stopped already (a test may stop an instance before its `with` ends)
        self.call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# The message a hang-up test streams: long enough to be cut off after three chunks.
HANG_UP_WORDS = " ".join(f"w{i}" for i in range(40))


async def hang_up_mid_stream(base_url: str, key: str) -> str:
    """Stream a turn of HANG_UP_WORDS, read three text chunks, drop the connection; the session id."""
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            f"{base_url}/chat/completions",
            json={
                "model": "veil",
                "messages": [{"role": "user", "content": HANG_UP_WORDS}],
                "stream": True,
            },
            headers={"Authorization": f"Bearer {key}"},
        )
        seen = 0
        async for line in resp.content:
            if (
                line.startswith(b"data: ")
                and b'"content":"' in line
                and b'"content":""' not in line
            ):
                seen += 1
                if seen == 3:
                    break
        resp.close()  # drop the connection mid-stream
        return resp.headers["X-Session-Id"]
