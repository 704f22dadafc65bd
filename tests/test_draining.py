"""A gateway that drains answers the requests in flight with `Connection: close`, so
that no client sends its next request on a connection about to be closed."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from config import Config
from edge.app import create_app
from edge.draining import DRAINING
from edge.http_guard import GuardedSite
from edge.webkeys import GUARD


async def test_an_answer_finished_while_draining_closes_its_connection(nats_url: str) -> None:
    app = create_app(Config(), nats_url)
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.json_response({"ok": True})

    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = GuardedSite(runner, "127.0.0.1", 0, app[GUARD])
    await site.start()
    url = f"http://127.0.0.1:{site.port}/slow"
    cleanup: asyncio.Task[None] | None = None
    try:
        async with aiohttp.ClientSession() as http:
            release.set()
            async with http.get(url) as before:
                assert before.status == 200
                assert before.headers.get("Connection", "").lower() != "close"
            release.clear()
            entered.clear()
            in_flight = asyncio.create_task(http.get(url))
            await asyncio.wait_for(entered.wait(), 10)
            cleanup = asyncio.create_task(runner.cleanup())
            await asyncio.wait_for(app[DRAINING].wait(), 10)
            release.set()
            during = await asyncio.wait_for(in_flight, 10)
            assert during.status == 200
            assert during.headers["Connection"].lower() == "close"
            assert await during.json() == {"ok": True}
            during.release()
    finally:
        release.set()
        await (cleanup if cleanup is not None else runner.cleanup())
