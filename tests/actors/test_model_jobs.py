"""A generation whose model worker dies is found out (actors/model_chain.py): the caller
asks the model actors who runs its job while it waits; the runner answers, and silence
from all of them, twice in a row, ends the call with a retryable `model_worker_lost`
instead of a wait as long as the turn's timeout. Over a real nats-server."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from actors.engines.base import DeltaSink, EngineOutput
from actors.model_actor import ModelActor
from actors.model_chain import call_model
from bus.subjects import model_generate
from config import FallbackConfig
from contracts.model import GenerateRequest
from eventstore.events import ChatMessage

JOB = GenerateRequest(
    turn_id="t1", upstream_model="m", messages=[ChatMessage(role="user", content="hi")]
)


class SlowEngine:
    """Answers after a while: longer than several of the caller's quiet periods."""

    name = "slow"

    async def generate(
        self,
        model: str,
        messages: list[ChatMessage],
        params: dict[str, Any],
        on_delta: DeltaSink | None,
        output: EngineOutput,
    ) -> None:
        await asyncio.sleep(0.6)
        output.parts.append("done")

    async def aclose(self) -> None:
        return None


async def test_a_running_generation_is_waited_for(nc: Client) -> None:
    actor = ModelActor(nc, {"slow": SlowEngine()}, version="0.0.0")
    await actor.start()
    try:
        link = FallbackConfig(engine="slow", model="m")
        result = await call_model(nc, link, JOB, timeout=30, quiet=0.05, probe=1.0)
        assert result.error is None and result.content == "done"
    finally:
        await actor.stop()


async def test_a_generation_nobody_runs_any_more_ends_as_lost(nc: Client) -> None:
    taken = asyncio.Event()

    async def swallow(msg: Msg) -> None:  # takes the job, then dies: never a word again
        taken.set()

    # A live model actor that does not run it (with none listening at all, the caller
    # cannot tell and waits, as with model actors of an earlier version).
    other = ModelActor(nc, {"slow": SlowEngine()}, version="0.0.0")
    await other.start()
    sub = await nc.subscribe(model_generate("doomed"), cb=swallow)
    try:
        link = FallbackConfig(engine="doomed", model="m")
        result = await asyncio.wait_for(
            call_model(nc, link, JOB, timeout=600, quiet=0.05, probe=0.2), 30
        )
    finally:
        await sub.unsubscribe()
        await other.stop()
    assert taken.is_set()
    assert result.error is not None
    assert (result.error.code, result.error.status, result.error.retryable) == (
        "model_worker_lost",
        503,
        True,
    )
