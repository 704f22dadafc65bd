"""The typed service every stateless actor runs on the bus.

A NATS micro service (so `nats micro ls/info/stats` list it) whose endpoints each
decode their request with one codec, call a handler with the message, and answer
with the handler's reply, encoded with the endpoint's reply codec. A request that
does not decode is answered with a 400 (the micro error headers), or in-band when
the endpoint's replies carry their own errors; a `ServiceError` the handler raises
is answered the same way with its own code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from bus import telemetry
from bus.codec import Codec, DecodeError

__all__ = ["Endpoint", "ServiceError", "TypedService", "start_service"]

Req = TypeVar("Req")
Rep = TypeVar("Rep")


class ServiceError(Exception):
    """A refusal with a status code (as text, the micro convention: "404")."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


@dataclass(frozen=True, slots=True)
class Endpoint(Generic[Req, Rep]):
    name: str
    subject: str
    request: Codec[Req]
    reply: Codec[Rep]
    handle: Callable[[Req], Awaitable[Rep]]
    # Each request on a task of its own (long calls: a generation, a tool) instead of
    # one after the other on the subscription.
    concurrent: bool = False
    # Replies that carry their own errors: a bad request is answered with refuse(reason).
    refuse: Callable[[str], Rep] | None = None


class TypedService:
    def __init__(self, service: Service) -> None:
        self.service = service
        self._tasks: set[asyncio.Task[None]] = set()

    async def add(self, endpoint: Endpoint[Any, Any]) -> None:
        async def serve(request: Request) -> None:
            try:
                message = endpoint.request.decode(request.data)
            except DecodeError as error:
                reason = f"bad {endpoint.name} request: {error}"
                if endpoint.refuse is not None:
                    await request.respond(endpoint.reply.encode(endpoint.refuse(reason)))
                else:
                    await request.respond_error("400", reason)
                return
            try:
                headers = request.headers
                if headers:
                    # The caller's trace and request id: the handler's spans and log
                    # lines belong to them.
                    trace = telemetry.incoming(headers)
                    with telemetry.serving(telemetry.request_id(headers), trace):
                        reply = await endpoint.handle(message)
                else:
                    reply = await endpoint.handle(message)
            except ServiceError as refusal:
                await request.respond_error(refusal.code, refusal.description)
                return
            await request.respond(endpoint.reply.encode(reply))

        async def on_request(request: Request) -> None:
            if not endpoint.concurrent:
                await serve(request)
                return
            task = asyncio.create_task(serve(request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        await self.service.add_endpoint(
            name=endpoint.name, subject=endpoint.subject, handler=on_request
        )

    @property
    def running(self) -> int:
        """Requests of concurrent endpoints still being served."""
        return len(self._tasks)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop taking requests; those running get `grace` seconds, then are cancelled."""
        with contextlib.suppress(Exception):
            await self.service.stop()
        if self._tasks and grace > 0:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def start_service(
    nc: Client,
    *,
    name: str,
    version: str,
    description: str,
    endpoints: Sequence[Endpoint[Any, Any]],
    stats_handler: Callable[[Any], Any] | None = None,
) -> TypedService:
    service = await add_service(
        nc, name=name, version=version, description=description, stats_handler=stats_handler
    )
    typed = TypedService(service)
    for endpoint in endpoints:
        await typed.add(endpoint)
    # Once this returns, the server knows the subscriptions: a request sent next, on any
    # connection, finds a responder.
    await nc.flush()
    return typed
