"""A gateway waiting on a turn asks who has it when the wait goes quiet (edge/relay.py):
a turn some worker holds (queued or running, actors/leases.py) is waited for; one that
nobody has (its worker died with it in hand) ends in a 503 `worker_lost` rather than a
wait as long as the accept timeout. Over a real nats-server, with the constants made
short so the test takes a second."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from actors.leases import Leases
from bus.subjects import SESSION_CMD_WILDCARD
from contracts.session import TURN_REPLY_CODEC, StartTurn, TurnDone
from edge import relay
from edge.openai_wire import ApiError
from eventstore.events import ChatMessage, Usage

START = StartTurn(
    command_id="c1",
    turn_id="t_where",
    session_id="s1",
    new_session=False,
    tenant="acme",
    key_id="k",
    model="veil",
    messages=[ChatMessage(role="user", content="hi")],
)


@pytest.fixture(autouse=True)
def _short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "QUIET_SECONDS", 0.05)
    monkeypatch.setattr(relay, "PROBE_SECONDS", 0.2)


async def test_a_turn_nobody_has_fails_as_lost(nc: Client) -> None:
    # A live worker that does not have it (with no worker listening at all, as during
    # an upgrade from workers that do not answer, the gateway cannot tell and waits).
    other = Leases(nc)
    await other.start()
    taken = asyncio.Event()

    async def swallow(msg: Msg) -> None:  # took it, then died: never a word again
        taken.set()

    subs = [
        await nc.subscribe(s, cb=swallow)
        for s in (SESSION_CMD_WILDCARD, f"{SESSION_CMD_WILDCARD}.*")
    ]
    try:
        with pytest.raises(ApiError) as lost:
            await asyncio.wait_for(relay.run_turn(nc, START, 600, lambda: False), 30)
    finally:
        for sub in subs:
            await sub.unsubscribe()
        await other.stop()
    assert taken.is_set()
    assert (lost.value.status, lost.value.code) == (503, "worker_lost")


async def test_without_any_worker_listening_the_gateway_waits(nc: Client) -> None:
    pending: list[Msg] = []

    async def old_worker(msg: Msg) -> None:  # answers turns, not the question
        pending.append(msg)

    subs = [
        await nc.subscribe(s, cb=old_worker)
        for s in (SESSION_CMD_WILDCARD, f"{SESSION_CMD_WILDCARD}.*")
    ]
    try:
        waiting = asyncio.ensure_future(relay.run_turn(nc, START, 600, lambda: False))
        await asyncio.sleep(1.0)
        assert not waiting.done()
        done = TurnDone(content="late but whole", finish_reason="stop", usage=Usage())
        await pending[0].respond(TURN_REPLY_CODEC.encode(done))
        result = await asyncio.wait_for(waiting, 10)
        assert isinstance(result, TurnDone) and result.content == "late but whole"
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def test_a_turn_a_worker_has_in_hand_is_waited_for(nc: Client) -> None:
    leases = Leases(nc)
    await leases.start()
    pending: list[Msg] = []

    async def queue(msg: Msg) -> None:  # in the mailbox, behind another turn
        leases.hand(START.turn_id)
        pending.append(msg)

    subs = [
        await nc.subscribe(s, cb=queue) for s in (SESSION_CMD_WILDCARD, f"{SESSION_CMD_WILDCARD}.*")
    ]
    try:
        waiting = asyncio.ensure_future(relay.run_turn(nc, START, 600, lambda: False))
        await asyncio.sleep(1.0)  # many quiet periods, each asked and answered
        assert not waiting.done()
        done = TurnDone(content="at last", finish_reason="stop", usage=Usage())
        await pending[0].respond(TURN_REPLY_CODEC.encode(done))
        leases.drop(START.turn_id)
        result = await asyncio.wait_for(waiting, 10)
        assert isinstance(result, TurnDone) and result.content == "at last"
    finally:
        for sub in subs:
            await sub.unsubscribe()
        await leases.stop()
