"""The typed service the stateless actors run: decode, handle, reply; 400 for what
does not decode; a handler's refusal with its own code; long calls side by side."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import pytest
from nats.aio.client import Client

from bus.codec import Codec
from bus.service import Endpoint, ServiceError, start_service


class Ask(msgspec.Struct, frozen=True):
    n: int


class Answer(msgspec.Struct, frozen=True):
    n: int
    error: str | None = None


ASK: Codec[Ask] = Codec(Ask)
ANSWER: Codec[Answer] = Codec(Answer)


async def test_endpoints_decode_answer_and_refuse(nc: Client, nats_url: str) -> None:
    server = await nats.connect(nats_url)
    gate = asyncio.Event()

    async def double(ask: Ask) -> Answer:
        if ask.n < 0:
            raise ServiceError("404", "no such number")
        return Answer(n=2 * ask.n)

    async def slow(ask: Ask) -> Answer:
        if ask.n == 0:
            await gate.wait()  # the first call waits for a later one
        else:
            gate.set()
        return Answer(n=ask.n)

    service = await start_service(
        server,
        name="test-typed",
        version="0.0.1",
        description="a test",
        endpoints=[
            Endpoint(name="double", subject="t.double", request=ASK, reply=ANSWER, handle=double),
            Endpoint(
                name="slow",
                subject="t.slow",
                request=ASK,
                reply=ANSWER,
                handle=slow,
                concurrent=True,
            ),
            Endpoint(
                name="inband",
                subject="t.inband",
                request=ASK,
                reply=ANSWER,
                handle=double,
                refuse=lambda reason: Answer(n=0, error=reason),
            ),
        ],
    )
    try:
        reply = await nc.request("t.double", ASK.encode(Ask(n=21)), timeout=5)
        assert ANSWER.decode(reply.data) == Answer(n=42)
        bad = await nc.request("t.double", b'{"n": "x"}', timeout=5)
        assert bad.headers is not None and bad.headers["Nats-Service-Error-Code"] == "400"
        assert "bad double request" in bad.headers["Nats-Service-Error"]
        refused = await nc.request("t.double", ASK.encode(Ask(n=-1)), timeout=5)
        assert refused.headers is not None and refused.headers["Nats-Service-Error-Code"] == "404"
        inband = ANSWER.decode((await nc.request("t.inband", b"[]", timeout=5)).data)
        assert inband.error is not None and "bad inband request" in inband.error
        # A concurrent endpoint serves the second call while the first still runs.
        first = asyncio.ensure_future(nc.request("t.slow", ASK.encode(Ask(n=0)), timeout=5))
        second = await nc.request("t.slow", ASK.encode(Ask(n=1)), timeout=5)
        assert ANSWER.decode(second.data).n == 1
        assert ANSWER.decode((await first).data).n == 0
    finally:
        await service.stop()
        await server.drain()


async def test_stop_cancels_what_outlives_its_grace(nc: Client, nats_url: str) -> None:
    server = await nats.connect(nats_url)
    started = asyncio.Event()

    async def forever(ask: Ask) -> Answer:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    service = await start_service(
        server,
        name="test-stop",
        version="0.0.1",
        description="a test",
        endpoints=[
            Endpoint(
                name="hang",
                subject="t.hang",
                request=ASK,
                reply=ANSWER,
                handle=forever,
                concurrent=True,
            )
        ],
    )
    pending = asyncio.ensure_future(nc.request("t.hang", ASK.encode(Ask(n=1)), timeout=2))
    await started.wait()
    assert service.running == 1
    await service.stop(grace=0.05)
    assert service.running == 0
    with pytest.raises(nats.errors.TimeoutError):
        await pending
    await server.drain()
