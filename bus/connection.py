"""Connecting to NATS with the callbacks wired and logged."""

from __future__ import annotations

import nats
import structlog
from nats.aio.client import Client

from bus.requests import connection_lost

__all__ = ["connect"]

log = structlog.get_logger("veil.bus")


async def connect(url: str, *, name: str) -> Client:
    """A NATS connection that logs disconnects, reconnects, errors and close."""

    async def on_disconnected() -> None:
        # Closing and draining disconnect too; only an unplanned loss is a warning.
        planned = nc.is_closed or nc.is_draining
        (log.info if planned else log.warning)("nats.disconnected", name=name)
        if not planned:
            connection_lost(nc)

    async def on_reconnected() -> None:
        log.info(
            "nats.reconnected",
            name=name,
            url=str(nc.connected_url.netloc if nc.connected_url else ""),
        )

    async def on_error(error: Exception) -> None:
        log.error("nats.error", name=name, error=repr(error))

    async def on_closed() -> None:
        log.info("nats.closed", name=name)

    nc = await nats.connect(
        url,
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
