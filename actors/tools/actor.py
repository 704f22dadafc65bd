"""The tool actor: runs server-side tools for session actors (`veil-tools`, subject `tools.run`)."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from actors.tools.builtin import BUILTIN, Tool, ToolError
from actors.tools.custom import http_tool, python_tool
from actors.tools.sandbox import ToolFailed, WorkerPool
from bus import telemetry
from bus.service import Endpoint, TypedService, start_service
from bus.subjects import TOOLS_RUN
from config import Config
from contracts.tools import RUN_CODEC, RUN_REPLY_CODEC, RunTool, ToolRan

__all__ = [
    "ToolActor",
    "configured_tools",
    "run_tool",
]


# Results longer than this are cut: the model's context is not a dump.
MAX_RESULT_CHARS = 16_000


async def run_tool(
    tool: Tool,
    arguments: str,
    timeout: float,
    context: dict[str, str | None] | None = None,
    *,
    pool: WorkerPool | None = None,
) -> ToolRan:
    """Run one call; bad arguments, failures and timeouts become an error the model reads.

    A tool with a `target` runs in a worker of `pool` (without one, a worker of its own).
    """
    started = time.perf_counter()

    def took() -> float:
        return round((time.perf_counter() - started) * 1000, 3)

    try:
        args: Any = json.loads(arguments or "{}")
        if not isinstance(args, dict):
            raise ToolError("arguments must be a JSON object")
        async with asyncio.timeout(timeout):
            result = await _call(tool, args, arguments or "{}", context, pool)
    except json.JSONDecodeError as error:
        return ToolRan(error=f"arguments are not valid JSON: {error.msg}", duration_ms=took())
    except RecursionError:
        return ToolRan(error="arguments are nested too deeply", duration_ms=took())
    except TypeError as error:
        return ToolRan(error=f"bad arguments: {error}", duration_ms=took())
    except TimeoutError:
        return ToolRan(error=f"the tool did not finish within {timeout:g} s", duration_ms=took())
    except ToolError as error:
        return ToolRan(error=str(error), duration_ms=took())
    except ToolFailed as error:
        return ToolRan(error=f"the tool failed: {error}", duration_ms=took())
    except Exception as error:  # noqa: BLE001 - a tool's own bug is the model's problem to route around
        return ToolRan(error=f"the tool failed: {error!r}", duration_ms=took())
    text = result if isinstance(result, str) else json.dumps(result, default=str)
    return ToolRan(content=text[:MAX_RESULT_CHARS], duration_ms=took())


async def _call(
    tool: Tool,
    args: dict[str, Any],
    arguments: str,
    context: dict[str, str | None] | None,
    pool: WorkerPool | None,
) -> Any:
    if tool.target is not None:
        if pool is None:
            async with WorkerPool(size=1) as own:
                return await own.call(tool.target, arguments, max_chars=MAX_RESULT_CHARS)
        return await pool.call(tool.target, arguments, max_chars=MAX_RESULT_CHARS)
    if tool.contextual:
        args["context"] = context or {}
    if inspect.iscoroutinefunction(tool.run):
        return await tool.run(**args)
    # A plain function with no name a worker could import it by (made in code, not from the
    # config): a thread keeps it off the event loop, but its timeout cannot stop it.
    return await asyncio.to_thread(tool.run, **args)


class ToolActor:
    def __init__(self, nc: Client, tools: dict[str, Tool], *, version: str) -> None:
        self._nc = nc
        self._tools = dict(tools)
        if "knowledge_search" in self._tools:
            self._tools["knowledge_search"] = msgspec.structs.replace(
                self._tools["knowledge_search"], run=self._knowledge_search
            )
        if "memory_search" in self._tools:
            self._tools["memory_search"] = msgspec.structs.replace(
                self._tools["memory_search"], run=self._memory_search
            )
        self._version = version
        # Plain-function tools run in its workers, which it starts when a call needs one.
        self._pool = WorkerPool()
        self._service: TypedService | None = None

    async def start(self) -> None:
        run = Endpoint(
            name="run",
            subject=TOOLS_RUN,
            request=RUN_CODEC,
            reply=RUN_REPLY_CODEC,
            handle=self.run,
            concurrent=True,
        )
        self._service = await start_service(
            self._nc,
            name="veil-tools",
            version=self._version,
            description="Runs server-side tools",
            endpoints=[run],
        )

    async def run(self, ask: RunTool) -> ToolRan:
        """Run one call as the bus asked for it."""
        tool = self._tools.get(ask.name)
        if tool is None:
            return ToolRan(error=f"no tool named {ask.name!r}")
        # The GenAI conventions' tool span (named after a tool this server has, only).
        with telemetry.span(f"execute_tool {ask.name}", kind=telemetry.SpanKind.SERVER) as span:
            ran = await run_tool(tool, ask.arguments, ask.timeout, ask.context, pool=self._pool)
            if span is not None:
                span.set_attributes(
                    {
                        "gen_ai.operation.name": "execute_tool",
                        "gen_ai.tool.name": ask.name,
                        "gen_ai.tool.type": "function",
                    }
                )
                if ran.error is not None:
                    telemetry.failed(span, "tool_error")
            return ran

    async def _memory_search(
        self, query: str, k: int = 5, *, context: dict[str, str | None]
    ) -> str:
        """Recall through the memory actor, in the calling turn's scope only."""
        from actors.memory.actor import ask_recall
        from contracts.memory import RecallRequest

        tenant, session_id = context.get("tenant"), context.get("session_id")
        if not tenant or not session_id:
            raise ToolError("memory search needs the turn's session")
        ask = RecallRequest(
            tenant=tenant,
            session_id=session_id,
            user_id=context.get("user_id"),
            query=query,
            k=max(1, min(k, 20)),
        )
        try:
            hits = await ask_recall(self._nc, ask, timeout=5)
        except (NoRespondersError, NatsTimeout):
            raise ToolError("long-term memory is not available") from None
        return json.dumps(
            [
                {"role": h.role, "text": h.text, "date": h.created_at.date().isoformat()}
                for h in hits
            ]
        )

    async def _knowledge_search(
        self, query: str, k: int = 4, *, context: dict[str, str | None]
    ) -> str:
        """Search the collections of the calling turn's pipeline."""
        from actors.knowledge.actor import ask_knowledge
        from actors.knowledge.prompting import quoted_chunk
        from contracts.knowledge import KnowledgeSearch

        collections = [c for c in (context.get("collections") or "").split(",") if c]
        if not collections:
            raise ToolError("this assistant has no knowledge collections")
        ask = KnowledgeSearch(collections=collections, query=query, k=max(1, min(k, 10)))
        try:
            hits = await ask_knowledge(self._nc, ask, timeout=10)
        except (NoRespondersError, NatsTimeout):
            raise ToolError("the knowledge base is not available") from None
        return (
            "\n".join(f"[{n}] {quoted_chunk(h)}" for n, h in enumerate(hits, start=1))
            or "nothing found"
        )

    async def stop(self) -> None:
        # Running calls get 10 s; what still runs after that is cut short: its worker is
        # killed and its call fails.
        if self._service is not None:
            await self._service.stop(grace=10)
        await self._pool.close()


def configured_tools(config: Config) -> dict[str, Tool]:
    """The built-in tools and the operator's, by name."""
    tools = dict(BUILTIN)
    for name, spec in config.tools.items():
        if spec.kind == "http":
            assert spec.url is not None
            tools[name] = http_tool(
                name,
                url=spec.url,
                method=spec.method,
                headers=spec.headers,
                description=spec.description,
                parameters=spec.parameters,
                timeout=spec.timeout,
                max_bytes=spec.max_bytes,
            )
        else:
            assert spec.callable is not None
            tools[name] = python_tool(name, spec.callable, spec.description, spec.parameters)
    return tools
