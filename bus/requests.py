"""Request-reply with less work per call than nats-py's `Client.request`.

A turn makes five requests (session command, three appends, the model call).
nats-py's request draws a token from os.urandom, makes two futures and arms
`asyncio.wait_for`'s timer for each; here a counter names the request under
one inbox subscription per connection, and one future waits under
`asyncio.timeout` (measured: 16-18 us less CPU per round trip, both sides).
Errors are nats-py's: `TimeoutError`, `NoRespondersError`, and whatever its
publish raises on a closed or draining connection.

While the connection is lost (nats-py reconnecting), a request fails at once with
`ConnectionReconnectingError` instead of waiting out its timeout for a reply that
cannot come, and `connection_lost` fails those already waiting: callers answer
"unavailable, try again" in milliseconds rather than hang.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

__all__ = ["BUS_DOWN", "connection_lost", "nats_request"]

# What nats-py raises while its connection is lost or going away.
BUS_DOWN = (
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.OutboundBufferLimitError,
)

# A reply that says nobody listens on the subject (nats-server's no-responders status).
_NO_RESPONDERS = "503"


class _Requester:
    """The replies of one connection's requests, on one wildcard inbox subscription."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._tokens = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self.ready = asyncio.ensure_future(nc.subscribe(self._prefix + "*", cb=self._on_reply))

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if future is not None and not future.done():
            future.set_result(msg)

    def fail_all(self) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(nats.errors.ConnectionReconnectingError())

    async def ask(
        self, subject: str, payload: bytes, timeout: float, headers: dict[str, str] | None
    ) -> Msg:
        if self._nc.is_reconnecting:
            raise nats.errors.ConnectionReconnectingError
        token = str(next(self._tokens))
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            async with asyncio.timeout(timeout):
                msg = await future
        except TimeoutError:
            raise nats.errors.TimeoutError from None
        finally:
            self._waiting.pop(token, None)
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            raise nats.errors.NoRespondersError
        return msg


_requesters: weakref.WeakKeyDictionary[Client, _Requester] = weakref.WeakKeyDictionary()


async def nats_request(
    nc: Client,
    subject: str,
    payload: bytes,
    *,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> Msg:
    """Send `payload` to `subject` and wait up to `timeout` seconds for the reply."""
    requester = _requesters.get(nc)
    if requester is None:
        requester = _requesters[nc] = _Requester(nc)
    if not requester.ready.done():
        await asyncio.shield(requester.ready)
    try:
        requester.ready.result()
    except Exception:
        _requesters.pop(nc, None)  # the next call subscribes again
        raise
    return await requester.ask(subject, payload, timeout, headers)


def connection_lost(nc: Client) -> None:
    """Fail every request waiting on `nc`: replies do not cross a lost connection."""
    requester = _requesters.get(nc)
    if requester is not None:
        requester.fail_all()
