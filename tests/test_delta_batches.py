"""Deltas produced together travel together: one NATS message, one HTTP write.

The model actor batches what an engine hands over without waiting; the gateway's
relay unpacks batches in order and waits for deltas that arrive after the final
message. Both over a real nats-server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
from nats.aio.client import Client

from actors.engines.base import DeltaSink, EngineOutput
from actors.model_actor import ModelActor
from bus.subjects import session_out
from contracts.model import GenerateRequest
from contracts.session import OUTPUT_CODEC, Delta, Deltas, StartTurn, TurnDone, TurnError
from edge.relay import TurnRelay
from eventstore.events import ChatMessage, Usage


class BurstyEngine:
    """Three pieces at once (as from one network read), then one more after a wait."""

    name = "bursty"

    async def generate(
        self,
        model: str,
        messages: list[ChatMessage],
        params: dict[str, Any],
        on_delta: DeltaSink | None,
        output: EngineOutput,
    ) -> None:
        assert on_delta is not None
        for piece in ("a", "b", "c"):
            output.parts.append(piece)
            await on_delta(piece)
        await asyncio.sleep(0.05)
        output.parts.append("d")
        await on_delta("d")

    async def aclose(self) -> None:
        return None


async def test_pieces_handed_over_together_are_one_message(nc: Client) -> None:
    out = "chat.session.s_batch.out.t1"
    seen: list[object] = []

    async def collect(msg: Any) -> None:
        seen.append(OUTPUT_CODEC.decode(msg.data))

    sub = await nc.subscribe(out, cb=collect)
    actor = ModelActor(nc, {"bursty": BurstyEngine()}, version="0")
    job = GenerateRequest(turn_id="t1", upstream_model="m", messages=[], out_subject=out)
    result = await actor.generate("bursty", job)
    await nc.flush()
    await asyncio.sleep(0.05)
    await sub.unsubscribe()
    assert result.content == "abcd" and result.deltas == 4
    # Everything is published before generate returns (the final message comes after it).
    assert seen == [
        Deltas(items=[Delta(seq=1, text="a"), Delta(seq=2, text="b"), Delta(seq=3, text="c")]),
        Delta(seq=4, text="d"),
    ]


def _start(session_id: str, turn_id: str) -> StartTurn:
    return StartTurn(
        command_id=turn_id,
        turn_id=turn_id,
        session_id=session_id,
        new_session=False,
        tenant="t",
        key_id="k",
        model="veil",
        messages=[],
        stream=True,
    )


async def test_relay_unpacks_batches_in_order_and_waits_for_late_deltas(nc: Client) -> None:
    start = _start("s_relay", "t2")
    out = session_out(start.tenant, start.session_id, start.turn_id)
    done = TurnDone(content="abcde", finish_reason="stop", usage=Usage(), deltas=5)
    async with TurnRelay(nc, start) as relay:
        await nc.publish(
            out, OUTPUT_CODEC.encode(Deltas(items=[Delta(seq=1, text="a"), Delta(seq=2, text="b")]))
        )
        await nc.publish(out, OUTPUT_CODEC.encode(Delta(seq=2, text="b")))  # a duplicate: dropped
        await nc.publish(out, OUTPUT_CODEC.encode(Delta(seq=3, text="c")))
        # The final message overtakes the last two deltas (another connection sends them).
        await nc.publish(out, OUTPUT_CODEC.encode(done))
        await nc.flush()

        async def late() -> None:
            await asyncio.sleep(0.1)
            await nc.publish(
                out,
                OUTPUT_CODEC.encode(Deltas(items=[Delta(seq=4, text="d"), Delta(seq=5, text="e")])),
            )

        sender = asyncio.create_task(late())
        batches = [batch async for batch in relay.batches(5, lambda: False)]
        await sender
    items = [item for batch in batches for item in batch]
    assert [i.text for i in items if isinstance(i, Delta)] == ["a", "b", "c", "d", "e"]
    assert items[-1] == done
    assert len(batches) <= 3  # what arrived together was handed over together


async def test_relay_holds_deltas_after_a_lost_one_so_the_text_has_no_hole(nc: Client) -> None:
    start = _start("s_gap", "t3")
    out = session_out(start.tenant, start.session_id, start.turn_id)
    done = TurnDone(content="abcdef", finish_reason="stop", usage=Usage(), deltas=6)
    async with TurnRelay(nc, start) as relay:
        for seq, text in ((1, "a"), (2, "b"), (4, "d"), (5, "e")):  # 3 is late
            await nc.publish(out, OUTPUT_CODEC.encode(Delta(seq=seq, text=text)))
        await nc.publish(out, OUTPUT_CODEC.encode(Delta(seq=3, text="c")))
        for seq, text in ((6, "f"), (8, "h")):  # 7 never comes
            await nc.publish(out, OUTPUT_CODEC.encode(Delta(seq=seq, text=text)))
        await nc.publish(out, OUTPUT_CODEC.encode(done))
        await nc.flush()
        batches = [batch async for batch in relay.batches(5, lambda: False)]
    items = [item for batch in batches for item in batch]
    deltas = [i for i in items if isinstance(i, Delta)]
    # In order, the late one in its place; nothing after the hole that never filled
    # (the final message's text carries the rest).
    assert [d.seq for d in deltas] == [1, 2, 3, 4, 5, 6]
    assert items[-1] == done


async def test_a_stream_whose_bus_goes_away_ends_with_an_error_item(nats_url: str) -> None:
    # Raised mid-stream, the failure could only break the client's connection; as the
    # last item it is written as an OpenAI-shaped error event.
    own = await nats.connect(nats_url)
    start = _start("s_bus", "t4")
    out = session_out(start.tenant, start.session_id, start.turn_id)
    async with TurnRelay(own, start) as relay:
        await own.publish(out, OUTPUT_CODEC.encode(Delta(seq=1, text="a")))
        await own.flush()
        batches = relay.batches(5, lambda: False)
        assert [d.seq for d in await anext(batches) if isinstance(d, Delta)] == [1]
        await own.close()
        [ended] = await anext(batches)
    assert isinstance(ended, TurnError) and ended.error.code == "service_unavailable"
    assert ended.deltas == 1 and relay.final is ended
