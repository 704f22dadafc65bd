"""Connecting to NATS with the callbacks wired and logged.

How to reach a cluster comes from the environment, so every role and operator command
connects the same way: VEIL_NATS_URL may list several servers (comma-separated), its
user and password are kept for servers the client learns from the cluster later, and
VEIL_NATS_CA / VEIL_NATS_CERT / VEIL_NATS_KEY give the CA to trust and the client
certificate to present (a cluster that verifies clients, cluster/cluster.conf). How many
replicas the streams and buckets Veil creates get is VEIL_NATS_REPLICAS (1 by default,
the embedded server; 3 on the cluster).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import nats
import structlog
from nats.aio.client import Client

from bus.requests import connection_lost

__all__ = ["connect", "replicas", "tls_context"]

log = structlog.get_logger("veil.bus")

# JetStream keeps at most 5 copies of a stream.
MAX_REPLICAS = 5


def replicas(env: Mapping[str, str] = os.environ) -> int:
    """The replica count for a stream or bucket Veil creates (an existing one keeps its own)."""
    raw = env.get("VEIL_NATS_REPLICAS", "").strip() or "1"
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_REPLICAS:
        raise ValueError(f"VEIL_NATS_REPLICAS must be 1 to {MAX_REPLICAS}, not {raw!r}")
    return int(raw)


def tls_context(env: Mapping[str, str] = os.environ) -> ssl.SSLContext | None:
    """The TLS the environment asks for (a CA, and a client certificate), else None."""
    ca, cert, key = (env.get(f"VEIL_NATS_{name}") or None for name in ("CA", "CERT", "KEY"))
    if ca is None and cert is None:
        return None
    context = ssl.create_default_context(cafile=ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    elif key is not None:
        raise ValueError("VEIL_NATS_KEY is set without VEIL_NATS_CERT")
    return context


def _server_options(url: str) -> dict[str, Any]:
    """The servers of a comma-separated URL list, and the credentials of the first (nats-py
    sends a URL's own only to that URL, not to the servers the cluster announces)."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    options: dict[str, Any] = {"servers": servers}
    first = urlsplit(servers[0]) if servers else None
    if first is not None and first.username and first.password is not None:
        options["user"] = unquote(first.username)
        options["password"] = unquote(first.password)
    context = tls_context()
    if context is not None:
        options["tls"] = context
    return options


async def connect(url: str, *, name: str) -> Client:
    """A NATS connection that logs disconnects, reconnects, errors and close."""

    async def on_disconnected() -> None:
        # Closing and draining disconnect too; only an unplanned loss is a warning.
        planned = nc.is_closed or nc.is_draining
        (log.info if planned else log.warning)("nats.disconnected", name=name)
        if not planned:
            connection_lost(nc)

    async def on_reconnected() -> None:
        server = nc.connected_url
        # Host and port only: the URL's netloc may hold a password or token.
        log.info(
            "nats.reconnected",
            name=name,
            url=f"{server.hostname}:{server.port}" if server else "",
        )

    async def on_error(error: Exception) -> None:
        log.error("nats.error", name=name, error=repr(error))

    async def on_closed() -> None:
        log.info("nats.closed", name=name)

    nc = await nats.connect(
        **_server_options(url),
        name=name,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        error_cb=on_error,
        closed_cb=on_closed,
        max_reconnect_attempts=-1,
        # nats-py waits 2 s between attempts by default: a restarted server (the embedded
        # one is back in ~0.15 s) would cost every process two seconds of 503s.
        reconnect_time_wait=0.25,
        connect_timeout=5,
    )
    return nc
