"""What the gateway's handlers share: typed app and request keys, the JSON response,
and reading a body within its time limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web
from nats.aio.client import Client

from bus.codec import encode
from config import Config
from edge.auth import Authenticator, Principal
from edge.http_guard import ConnectionGuard
from edge.keystore import KeyStore
from edge.openai_wire import ApiError

__all__ = [
    "AUTH",
    "CONFIG",
    "GUARD",
    "KEYSTORE",
    "NATS",
    "PRINCIPAL",
    "body_deadline",
    "json_response",
]

CONFIG = web.AppKey("config", Config)
NATS = web.AppKey("nats", Client)
AUTH = web.AppKey("auth", Authenticator)
GUARD = web.AppKey("guard", ConnectionGuard)
KEYSTORE = web.AppKey("keystore", KeyStore)
PRINCIPAL = web.RequestKey("principal", Principal)


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=encode(body), status=status, content_type="application/json", headers=headers
    )


@asynccontextmanager
async def body_deadline(request: web.Request) -> AsyncIterator[None]:
    """Reading the body inside this block must end within `server.body_timeout` (else 408)."""
    seconds = request.app[CONFIG].server.body_timeout
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise ApiError(
            408,
            f"The request body did not arrive within {seconds:g} seconds.",
            code="request_timeout",
        ) from None
