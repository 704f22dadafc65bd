"""The tool actor: runs server-side tools for session actors (`veil-tools`, subject `tools.run`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from actors.tools.builtin import BUILTIN, Tool, ToolError
from bus.codec import Codec, DecodeError
from bus.subjects import TOOLS_RUN

__all__ = ["RUN_CODEC", "RUN_REPLY_CODEC", "RunTool", "ToolActor", "ToolRan"]


class RunTool(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    # JSON text as the model wrote it.
    arguments: str
    timeout: float = 10.0


class ToolRan(msgspec.Struct, frozen=True, kw_only=True):
    content: str = ""
    error: str | None = None
    duration_ms: float = 0.0


RUN_CODEC: Codec[RunTool] = Codec(RunTool)
RUN_REPLY_CODEC: Codec[ToolRan] = Codec(ToolRan)
# Results longer than this are cut: the model's context is not a dump.
MAX_RESULT_CHARS = 16_000


async def run_tool(tool: Tool, arguments: str, timeout: float) -> ToolRan:
    """Run one call; bad arguments, failures and timeouts become an error the model reads."""
    started = time.perf_counter()

    def took() -> float:
        return round((time.perf_counter() - started) * 1000, 3)

    try:
        args: Any = json.loads(arguments or "{}")
        if not isinstance(args, dict):
            raise ToolError("arguments must be a JSON object")
        # Tools are plain functions; a thread keeps a slow one off the event loop.
        result = await asyncio.wait_for(asyncio.to_thread(tool.run, **args), timeout)
    except json.JSONDecodeError as error:
        return ToolRan(error=f"arguments are not valid JSON: {error.msg}", duration_ms=took())
    except TypeError as error:
        return ToolRan(error=f"bad arguments: {error}", duration_ms=took())
    except TimeoutError:
        return ToolRan(error=f"the tool did not finish within {timeout:g} s", duration_ms=took())
    except ToolError as error:
        return ToolRan(error=str(error), duration_ms=took())
    except Exception as error:  # a tool's own bug is the model's problem to route around
        return ToolRan(error=f"the tool failed: {error!r}", duration_ms=took())
    text = result if isinstance(result, str) else json.dumps(result, default=str)
    return ToolRan(content=text[:MAX_RESULT_CHARS], duration_ms=took())


class ToolActor:
    def __init__(self, nc: Client, tools: dict[str, Tool], *, version: str) -> None:
        self._nc = nc
        self._tools = tools
        self._version = version
        self._service: Service | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._service = await add_service(
            self._nc, name="veil-tools", version=self._version, description="Runs server-side tools"
        )
        await self._service.add_endpoint(name="run", subject=TOOLS_RUN, handler=self._handle)

    async def _handle(self, request: Request) -> None:
        task = asyncio.create_task(self._serve(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, request: Request) -> None:
        try:
            ask = RUN_CODEC.decode(request.data)
        except DecodeError as error:
            await request.respond_error("400", str(error))
            return
        tool = self._tools.get(ask.name)
        ran = ToolRan(error=f"no tool named {ask.name!r}") if tool is None else await run_tool(tool, ask.arguments, ask.timeout)
        await request.respond(RUN_REPLY_CODEC.encode(ran))

    async def stop(self) -> None:
        if self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.stop()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10)


def builtin_tools() -> dict[str, Tool]:
    return dict(BUILTIN)
