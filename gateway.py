"""The HTTP face of Veil: OpenAI's chat API over aiohttp, relayed to session actors on NATS.

The application lives in the `edge` package (routes, wire formats, SSE, auth, limits);
this module is its face, as the design names it: `gateway.create_app(config, nats_url)`.
"""

from __future__ import annotations

from edge.app import create_app
from edge.webkeys import AUTH, CONFIG, NATS

__all__ = ["AUTH", "CONFIG", "NATS", "create_app"]
