"""Running a turn's effects (actors/turn.py) over the bus: the I/O half of a turn.

Each effect comes back as an observation, failures included: a router, memory or
knowledge actor that is away or late, a model actor that fails, a tool that
errs. Nothing here decides what happens next; the workflow does.
"""

from __future__ import annotations

import asyncio
import contextlib

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from actors import turn
from actors.knowledge.actor import ask_knowledge
from actors.memory.actor import ask_recall
from actors.model_chain import call_model
from bus import telemetry
from bus.codec import DecodeError
from bus.requests import nats_request
from bus.subjects import ROUTER_ROUTE, TOOLS_RUN
from contracts.router import ROUTE_CODEC, ROUTE_REPLY_CODEC, RouteRequest
from contracts.tools import RUN_CODEC, RUN_REPLY_CODEC, RunTool, ToolRan
from eventstore.events import ToolCall, ToolResult

__all__ = ["TurnEffects"]

# How long the router and the knowledge actor may take.
ROUTER_TIMEOUT = 10.0
KNOWLEDGE_TIMEOUT = 10.0
# A tool's own timeout fires first; this covers the tool actor being slow to answer.
TOOL_REPLY_GRACE = 5.0


class TurnEffects:
    def __init__(self, nc: Client, *, model_timeout: float) -> None:
        self._nc = nc
        self._model_timeout = model_timeout

    async def run(self, effect: turn.Effect, cancelled: asyncio.Event) -> turn.Observation:
        match effect:
            case turn.AskRouter(request=ask):
                return await self._route(ask)
            case turn.CallModel(link=link, job=job):
                # The engine's own timeout fires first, so a slow upstream reads as 504 from it.
                result = await call_model(self._nc, link, job, timeout=self._model_timeout)
                return turn.ModelAnswered(result=result)
            case turn.Recall(request=ask, timeout=timeout):
                try:
                    return turn.Recalled(hits=await ask_recall(self._nc, ask, timeout=timeout))
                except NoRespondersError:
                    return turn.Recalled(absent=True)
                except (NatsTimeout, DecodeError) as failure:
                    return turn.Recalled(failure=repr(failure))
            case turn.Retrieve(request=ask):
                try:
                    hits = await ask_knowledge(self._nc, ask, timeout=KNOWLEDGE_TIMEOUT)
                except (NoRespondersError, NatsTimeout, DecodeError) as failure:
                    return turn.Retrieved(failure=repr(failure))
                return turn.Retrieved(hits=hits)
            case turn.RunTools(calls=calls, timeout=timeout, context=context):
                runs = (self._tool(call, timeout, context) for call in calls)
                return turn.ToolsRan(results=list(await asyncio.gather(*runs)))
            case turn.Pause(seconds=seconds):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(seconds):
                        await cancelled.wait()
                return turn.Paused()

    async def _route(self, ask: RouteRequest) -> turn.Routed:
        try:
            reply = await nats_request(
                self._nc,
                ROUTER_ROUTE,
                ROUTE_CODEC.encode(ask),
                timeout=ROUTER_TIMEOUT,
                headers=telemetry.outgoing(),
            )
            return turn.Routed(decision=ROUTE_REPLY_CODEC.decode(reply.data))
        except (NoRespondersError, NatsTimeout, DecodeError) as failure:
            return turn.Routed(failure=repr(failure))

    async def _tool(
        self, call: ToolCall, timeout: float, context: dict[str, str | None]
    ) -> ToolResult:
        """One server tool call through the tool actor; a failure becomes the result."""
        ask = RunTool(
            name=call.function.name,
            arguments=call.function.arguments,
            timeout=timeout,
            context=context,
        )
        try:
            reply = await nats_request(
                self._nc,
                TOOLS_RUN,
                RUN_CODEC.encode(ask),
                timeout=timeout + TOOL_REPLY_GRACE,
                headers=telemetry.outgoing(),
            )
            ran = RUN_REPLY_CODEC.decode(reply.data)
        except NoRespondersError:
            ran = ToolRan(error="no tool worker is running")
        except NatsTimeout:
            ran = ToolRan(error=f"the tool did not answer within {timeout:g} s")
        except DecodeError:
            ran = ToolRan(error="the tool worker answered badly")
        return ToolResult(
            call_id=call.id,
            name=call.function.name,
            arguments=call.function.arguments,
            content=ran.content,
            error=ran.error,
            duration_ms=ran.duration_ms,
        )
