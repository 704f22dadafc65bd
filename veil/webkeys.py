"""What the gateway's handlers share: typed app and request keys, and the JSON response."""

from __future__ import annotations

from aiohttp import web
from nats.aio.client import Client

from bus.codec import encode
from veil.auth import Authenticator, Principal
from veil.config import Config

__all__ = ["AUTH", "CONFIG", "NATS", "PRINCIPAL", "json_response"]

CONFIG = web.AppKey("config", Config)
NATS = web.AppKey("nats", Client)
AUTH = web.AppKey("auth", Authenticator)
PRINCIPAL = web.RequestKey("principal", Principal)


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=encode(body), status=status, content_type="application/json", headers=headers
    )
