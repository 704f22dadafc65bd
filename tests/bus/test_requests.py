"""The lean request-reply: replies reach their own callers; nats-py's errors for failures."""

from __future__ import annotations

import asyncio

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.requests import nats_request


async def test_concurrent_requests_each_get_their_own_reply(nc: Client, nats_url: str) -> None:
    responder = await nats.connect(nats_url)

    async def answer_later(msg: Msg) -> None:
        # Later requests are answered first: replies arrive out of order.
        n = int(msg.data)
        await asyncio.sleep(0.002 * (20 - n))
        await msg.respond(b"re:" + msg.data)

    async def on_request(msg: Msg) -> None:
        asyncio.create_task(answer_later(msg))

    await responder.subscribe("t.requests.echo", cb=on_request)
    await responder.flush()
    try:
        replies = await asyncio.gather(
            *(nats_request(nc, "t.requests.echo", str(n).encode(), timeout=5) for n in range(20))
        )
        assert [r.data for r in replies] == [f"re:{n}".encode() for n in range(20)]
    finally:
        await responder.close()


async def test_headers_go_with_the_request(nc: Client) -> None:
    async def echo_header(msg: Msg) -> None:
        await msg.respond((msg.headers or {}).get("Veil-Test", "").encode())

    await nc.subscribe("t.requests.headers", cb=echo_header)
    reply = await nats_request(
        nc, "t.requests.headers", b"", timeout=5, headers={"Veil-Test": "yes"}
    )
    assert reply.data == b"yes"


async def test_nobody_listening_is_no_responders(nc: Client) -> None:
    with pytest.raises(nats.errors.NoRespondersError):
        await nats_request(nc, "t.requests.nobody", b"x", timeout=5)


async def test_a_silent_responder_times_out_and_a_late_reply_is_dropped(nc: Client) -> None:
    held: list[Msg] = []

    async def hold(msg: Msg) -> None:
        held.append(msg)

    await nc.subscribe("t.requests.silent", cb=hold)
    with pytest.raises(nats.errors.TimeoutError):
        await nats_request(nc, "t.requests.silent", b"x", timeout=0.2)
    await held[0].respond(b"too late")  # nobody waits for it any more: no error
    await nc.flush()

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe("t.requests.after", cb=echo)
    assert (
        await nats_request(nc, "t.requests.after", b"still fine", timeout=5)
    ).data == b"still fine"


async def test_a_closed_connection_raises(nats_url: str) -> None:
    used = await nats.connect(nats_url)

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await used.subscribe("t.requests.closing", cb=echo)
    assert (await nats_request(used, "t.requests.closing", b"1", timeout=5)).data == b"1"
    await used.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await nats_request(used, "t.requests.closing", b"2", timeout=1)

    never_used = await nats.connect(nats_url)
    await never_used.close()
    for _ in range(2):  # the failed set-up is not kept: each call tries and fails again
        with pytest.raises(nats.errors.ConnectionClosedError):
            await nats_request(never_used, "t.requests.closing", b"3", timeout=1)
