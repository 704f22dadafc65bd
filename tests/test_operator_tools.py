"""Operator tools (HTTP template, Python callable) and the memory search tool, through the whole path."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from aiohttp import web

from actors.tools.custom import schema_from_signature
from config import Config, EngineConfig, ModelConfig, PipelineConfig, ToolConfig
from eventstore.events import ToolsCalled
from testkit.upstreams import FakeOpenAI, ToolCalls
from tests.harness import VeilThread
from veil.natsserver import NatsServer

script: dict[str, Any] = {}


def shout(text: str, times: int = 1) -> str:
    """Repeat the text in capitals."""
    return " ".join([text.upper()] * times)


@pytest.fixture(scope="module")
def catalogue() -> Iterator[str]:
    """A real HTTP service for the HTTP tool: a tiny price list, and a huge page."""

    async def price(request: web.Request) -> web.Response:
        item = request.match_info["item"]
        if item == "huge":
            return web.Response(text="x" * 10_000)
        prices = {"tea": "3.50", "café crème": "4.20"}
        if item not in prices:
            return web.Response(status=404, text="no such item")
        return web.Response(
            text=json.dumps({"item": item, "price": prices[item]}, ensure_ascii=False)
        )

    import asyncio

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(web.Application())
    runner.app.router.add_get("/price/{item}", price)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply=lambda body: script["reply"](body)) as fake:
        yield fake


@pytest.fixture(scope="module")
def veil(
    upstream: FakeOpenAI, catalogue: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VeilThread]:
    with NatsServer(tmp_path_factory.mktemp("tools-nats")) as nats_server:
        config = Config(
            engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
            tools={
                "price": ToolConfig(
                    kind="http",
                    url=catalogue + "/price/{item}",
                    description="Price of an item.",
                    max_bytes=100,
                ),
                "shout": ToolConfig(kind="python", callable="tests.test_operator_tools:shout"),
            },
            pipelines={
                "default": PipelineConfig(
                    engine="up", model="m", tools=["price", "shout", "memory_search"]
                )
            },
            models=[ModelConfig(name="veil", pipeline="default")],
            nats_url=nats_server.url,
        )
        with VeilThread(config, nats_server.url) as server:
            yield server


def one_call(name: str, arguments: dict[str, Any] | str) -> Any:
    def reply(body: dict[str, Any]) -> str | ToolCalls:
        answers = [m["content"] for m in body["messages"] if m["role"] == "tool"]
        return f"-> {answers[-1]}" if answers else ToolCalls([(name, arguments)])

    return reply


def ask(veil: VeilThread, text: str, sid: str | None = None) -> tuple[str, str]:
    with openai.OpenAI(base_url=veil.base_url, api_key="x", max_retries=0) as client:
        reply = client.chat.completions.create(
            model="veil",
            messages=[{"role": "user", "content": text}],
            extra_body={"session_id": sid} if sid else None,
        )
    return str(reply.choices[0].message.content), str(reply.model_extra["session_id"])


def test_schema_from_signature() -> None:
    assert schema_from_signature(shout) == {
        "type": "object",
        "properties": {"text": {"type": "string"}, "times": {"type": "integer"}},
        "required": ["text"],
    }


def test_the_tools_reach_the_model_with_their_schemas(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    script["reply"] = lambda body: "ok"
    ask(veil, "hello")
    tools = {t["function"]["name"]: t["function"] for t in upstream.last_request.body["tools"]}
    assert tools["price"]["parameters"]["required"] == ["item"]
    assert tools["shout"]["description"] == "Repeat the text in capitals."
    assert tools["memory_search"]["parameters"]["required"] == ["query"]


def test_http_tool_fills_the_template_and_caps_the_size(veil: VeilThread) -> None:
    script["reply"] = one_call("price", {"item": "café crème"})
    assert ask(veil, "price?")[0] == '-> {"item": "café crème", "price": "4.20"}'
    script["reply"] = one_call("price", {"item": "huge"})
    assert ask(veil, "huge?")[0] == "-> " + "x" * 100 + "\n[cut at 100 bytes]"
    script["reply"] = one_call("price", {"item": "caviar"})
    assert ask(veil, "caviar?")[0] == "-> Error: HTTP 404: no such item"


def test_python_tool(veil: VeilThread) -> None:
    script["reply"] = one_call("shout", {"text": "hi", "times": 2})
    content, sid = ask(veil, "shout")
    assert content == "-> HI HI"
    step = next(e for e in veil.events(sid) if isinstance(e, ToolsCalled))
    assert step.results[0].name == "shout" and step.results[0].content == "HI HI"


def test_memory_search_tool_sees_only_this_sessions_scope(veil: VeilThread) -> None:
    script["reply"] = lambda body: "noted"
    _, sid = ask(veil, "My bike lock code is 7731.")
    _, _other = ask(veil, "My bike lock code is 1111.")  # another anonymous session
    veil.wait_for_memory()
    script["reply"] = one_call("memory_search", {"query": "bike lock code"})
    content, _ = ask(veil, "what was my code?", sid)
    assert "7731" in content and "1111" not in content
