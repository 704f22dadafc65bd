"""Answers finished while the gateway drains tell their client not to reuse the connection.

On shutdown aiohttp stops listening, closes idle connections and lets the requests in
flight finish, closing each connection after its answer. An answer that said nothing
of it lets the client put the connection back in its pool and send its next request
on it, into a close: the request is lost in the socket and the client sees a reset.
With `Connection: close` the client opens a new connection (to another gateway, or to
this one's successor) instead. A request sent on an idle connection just as it is
closed still meets the close: no header can reach a connection that is not answering.
"""

from __future__ import annotations

import asyncio

from aiohttp import hdrs, web

__all__ = ["DRAINING", "add_draining"]

DRAINING = web.AppKey("draining", asyncio.Event)


def add_draining(app: web.Application) -> None:
    app[DRAINING] = asyncio.Event()
    app.on_shutdown.append(_begin)
    app.on_response_prepare.append(_close_when_draining)


async def _begin(app: web.Application) -> None:
    app[DRAINING].set()


async def _close_when_draining(request: web.Request, response: web.StreamResponse) -> None:
    if request.app[DRAINING].is_set():
        # The headers are made before this hook runs: say it, and do it.
        response.headers[hdrs.CONNECTION] = "close"
        response.force_close()
