"""veil.client against a real gateway and workers: the session id is kept for the caller."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from config import ApiKey, Config, EngineConfig, ModelConfig, PipelineConfig
from testkit.upstreams import FakeOpenAI, ToolCalls
from tests.harness import VeilThread
from veil.client import AsyncVeilClient, SessionNotStarted, VeilClient

REPO = Path(__file__).resolve().parent.parent
KEY_A = "sk-client-a"
KEY_B = "sk-client-b"
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def reply(body: dict[str, Any]) -> str | ToolCalls:
    """Echo the last user message; ask for the weather tool when a message asks for it."""
    last = body["messages"][-1]
    if last["role"] == "tool":
        return f"The weather: {last['content']}"
    if body.get("tools") and "weather" in last["content"]:
        return ToolCalls([("get_weather", {"city": "Paris"})])
    return f"echo: {last['content']}"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply=reply) as fake:
        yield fake


@pytest.fixture(scope="module")
def veil(nats_url: str, upstream: FakeOpenAI) -> Iterator[VeilThread]:
    config = Config(
        keys=[ApiKey(key=KEY_A, tenant="a"), ApiKey(key=KEY_B, tenant="b")],
        engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
        pipelines={"default": PipelineConfig(engine="up", model="m", retries=0)},
        models=[ModelConfig(name="veil", pipeline="default")],
        nats_url=nats_url,
    )
    with VeilThread(config, nats_url) as server:
        yield server


@pytest.fixture
def client(veil: VeilThread) -> Iterator[VeilClient]:
    with VeilClient(base_url=veil.base_url, api_key=KEY_A, max_retries=0) as c:
        yield c


def dialogue(body: dict[str, Any]) -> list[tuple[str, str]]:
    """What the upstream was asked, without the system prompt (recalled memories go there)."""
    return [(m["role"], m["content"]) for m in body["messages"] if m["role"] != "system"]


def test_a_session_sends_only_the_new_message_and_the_model_sees_it_all(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    sent: list[tuple[dict[str, Any], str | None]] = []

    def record(request: Any) -> None:
        if request.url.path.endswith("/chat/completions"):
            sent.append((json.loads(request.content), request.headers.get("X-Session-Id")))

    http = openai.DefaultHttpxClient(event_hooks={"request": [record]})
    with VeilClient(base_url=veil.base_url, api_key=KEY_A, http_client=http) as client:
        session = client.session(model="veil")
        assert session.id is None
        assert session.chat("I'm Ann.") == "echo: I'm Ann."
        assert session.id is not None and session.id.startswith("sess_")
        assert session.last is not None and session.last.model_extra["session_id"] == session.id
        assert session.chat("Who am I?") == "echo: Who am I?"
    assert dialogue(upstream.last_request.body) == [
        ("user", "I'm Ann."),
        ("assistant", "echo: I'm Ann."),
        ("user", "Who am I?"),
    ]
    # The first request names no session; the second only its new message, under the id.
    assert [(body["messages"], sid) for body, sid in sent] == [
        ([{"role": "user", "content": "I'm Ann."}], None),
        ([{"role": "user", "content": "Who am I?"}], session.id),
    ]


def test_streaming_learns_the_id_and_continues_the_session(
    client: VeilClient, upstream: FakeOpenAI
) -> None:
    session = client.session()
    pieces = session.stream("one two three four")
    assert next(pieces) == "echo:"
    assert session.id is not None  # from the headers, before the rest of the reply
    assert "".join(pieces) == " one two three four"
    assert session.last is not None
    assert session.last.choices[0].message.content == "echo: one two three four"
    assert session.last.choices[0].finish_reason == "stop"
    assert "".join(session.stream("and five")) == "echo: and five"
    assert dialogue(upstream.last_request.body) == [
        ("user", "one two three four"),
        ("assistant", "echo: one two three four"),
        ("user", "and five"),
    ]
    assert session.info().turns == 2


def test_a_session_resumed_by_id(veil: VeilThread, upstream: FakeOpenAI) -> None:
    with VeilClient(base_url=veil.base_url, api_key=KEY_A, max_retries=0) as first:
        opened = first.session()
        opened.chat("Remember 42.")
    with VeilClient(base_url=veil.base_url, api_key=KEY_A, max_retries=0) as later:
        resumed = later.session(session_id=opened.id)
        assert resumed.chat("Which number?") == "echo: Which number?"
        assert resumed.id == opened.id
        assert dialogue(upstream.last_request.body)[0] == ("user", "Remember 42.")
        assert resumed.info().turns == 2


def test_messages_info_turns_and_delete(client: VeilClient) -> None:
    session = client.session()
    first = session.complete("first")
    second = session.complete("second")
    assert [(m.role, m.content) for m in session.messages()] == [
        ("user", "first"),
        ("assistant", "echo: first"),
        ("user", "second"),
        ("assistant", "echo: second"),
    ]
    info = session.info()
    assert (info.id, info.turns, info.model) == (session.id, 2, "veil")
    assert info.usage.total_tokens > 0
    turns = session.turns()
    assert [t.id for t in turns] == [c.id.removeprefix("chatcmpl-") for c in (first, second)]
    assert {t.status for t in turns} == {"completed"}
    assert session.turns(after=first.id) == turns[1:]
    one = session.turn(second.id)  # a completion id names its turn
    assert one == turns[1] and one.model_dump()["pipeline"]["name"] == "default"  # kept
    deleted = session.delete()
    assert (deleted.id, deleted.deleted) == (session.id, True)
    with pytest.raises(openai.NotFoundError):
        session.info()
    with pytest.raises(openai.NotFoundError):
        session.chat("still there?")


def test_memories(client: VeilClient, veil: VeilThread) -> None:
    session = client.session()
    session.chat("My dog is called Biscuit and loves the beach.")
    session.chat("I also collect old maps.")
    veil.wait_for_memory()
    found = session.memories("What is my dog called?")
    assert found and all(m.session_id == session.id for m in found)
    assert "Biscuit" in found[0].content
    assert len(session.memories("dog", limit=1)) == 1
    with pytest.raises(openai.BadRequestError):
        session.memories("dog", limit=0)


def test_a_sessions_user_goes_with_it(client: VeilClient, veil: VeilThread) -> None:
    """The user named on the session reaches Veil: its memories span that user's sessions."""
    user = f"ann-{uuid.uuid4().hex[:8]}"
    first = client.session(user=user)
    first.chat("My cat is called Miso.")
    second = client.session(user=user)
    second.chat("Hello again.")
    nobody = client.session()
    nobody.chat("Hello there.")
    veil.wait_for_memory()
    assert any(m.session_id == first.id and "Miso" in m.content for m in second.memories("cat"))
    assert {m.session_id for m in nobody.memories("cat")} <= {nobody.id}


def test_tool_calls_pass_through(client: VeilClient) -> None:
    session = client.session()
    asked = session.complete("What's the weather in Paris?", tools=TOOLS)
    call = asked.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    answer = session.chat(
        [{"role": "tool", "tool_call_id": call.id, "content": "sunny"}], tools=TOOLS
    )
    assert answer == "The weather: sunny"
    # Streamed: no text, and the call is in the completion the stream added up to.
    assert list(session.stream("And the weather tomorrow?", tools=TOOLS)) == []
    assert session.last is not None and session.last.choices[0].finish_reason == "tool_calls"
    streamed_call = session.last.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert json.loads(streamed_call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert session.chat(
        [{"role": "tool", "tool_call_id": streamed_call.id, "content": "rain"}], tools=TOOLS
    ) == ("The weather: rain")


def test_two_sessions_stay_apart(client: VeilClient, upstream: FakeOpenAI) -> None:
    ann, bob = client.session(), client.session()
    ann.chat("I am Ann.")
    bob.chat("I am Bob.")
    ann.chat("Who am I?")
    assert dialogue(upstream.last_request.body) == [
        ("user", "I am Ann."),
        ("assistant", "echo: I am Ann."),
        ("user", "Who am I?"),
    ]
    bob.chat("And me?")
    assert dialogue(upstream.last_request.body)[0] == ("user", "I am Bob.")
    assert ann.id != bob.id
    assert [m.content for m in bob.messages()] == [
        "I am Bob.",
        "echo: I am Bob.",
        "And me?",
        "echo: And me?",
    ]


def test_errors_are_the_sdks(veil: VeilThread, client: VeilClient) -> None:
    with pytest.raises(SessionNotStarted):
        client.session().messages()
    with pytest.raises(openai.NotFoundError) as missing:
        client.session(session_id="sess_never_was").info()
    assert missing.value.body["code"] == "session_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.session(session_id="not.an.id").chat("hello?")
    with pytest.raises(openai.NotFoundError):
        client.session(model="no-such-model").chat("hello?")
    with pytest.raises(openai.NotFoundError):
        list(client.session(model="no-such-model").stream("hello?"))
    ours = client.session()
    ours.chat("private")
    with VeilClient(base_url=veil.base_url, api_key=KEY_B, max_retries=0) as other:
        foreign = other.session(session_id=ours.id)
        with pytest.raises(openai.NotFoundError):
            foreign.messages()
        with pytest.raises(openai.NotFoundError):
            foreign.delete()
    with VeilClient(base_url=veil.base_url, api_key="sk-wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.session().chat("hello?")
        with pytest.raises(openai.AuthenticationError):
            list(stranger.session().stream("hello?"))
        with pytest.raises(openai.AuthenticationError):
            stranger.session(session_id=ours.id).info()
    assert [m.content for m in ours.messages()] == ["private", "echo: private"]


async def test_async_session(veil: VeilThread, upstream: FakeOpenAI) -> None:
    async with AsyncVeilClient(base_url=veil.base_url, api_key=KEY_A, max_retries=0) as client:
        session = client.session()
        assert await session.chat("I'm Ann.") == "echo: I'm Ann."
        pieces = [p async for p in session.stream("Who am I?")]
        assert len(pieces) > 1 and "".join(pieces) == "echo: Who am I?"
        assert dialogue(upstream.last_request.body) == [
            ("user", "I'm Ann."),
            ("assistant", "echo: I'm Ann."),
            ("user", "Who am I?"),
        ]
        assert [m.role for m in await session.messages()] == ["user", "assistant"] * 2
        assert (await session.info()).turns == 2
        turns = await session.turns()
        assert [t.status for t in turns] == ["completed", "completed"]
        assert await session.turn(turns[0].id) == turns[0]
        veil.wait_for_memory()
        assert any("Ann" in m.content for m in await session.memories("Ann"))
        streamed = client.session()
        async with contextlib.aclosing(streamed.stream("a first streamed turn")) as stream:
            async for piece in stream:  # left after its first piece: the id is known already
                assert piece == "echo:"
                break
        resumed = client.session(session_id=streamed.id)
        assert await resumed.chat("more") == "echo: more"
        assert dialogue(upstream.last_request.body)[0] == ("user", "a first streamed turn")
        assert (await session.delete()).deleted
        with pytest.raises(openai.NotFoundError):
            await session.info()
        with pytest.raises(openai.NotFoundError):
            await session.chat("still there?")


def readme_example() -> str:
    """The Python block of the README's section on the client library."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### A small client library", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found is not None, "the README's client section has no python block"
    return found.group(1)


def test_the_readme_example_runs(veil: VeilThread, upstream: FakeOpenAI) -> None:
    env = {**os.environ, "VEIL_BASE_URL": veil.base_url, "VEIL_API_KEY": KEY_A}
    run = subprocess.run(
        [sys.executable, "-c", readme_example()],
        check=False,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "assistant: echo: What is my name?" in run.stdout
    assert dialogue(upstream.last_request.body)[0] == ("user", "My name is Ann.")


# Veil's server packages: importing the client must load none of them.
SERVER = {"actors", "bus", "config", "contracts", "edge", "eventstore", "gateway", "testkit"}
# What importing the client loads past the SDK (which may load aiohttp on its own).
LOADED_PAST_THE_SDK = """
import sys
import openai, openai.lib.streaming.chat, openai.types.chat
before = set(sys.modules)
import veil.client
print(" ".join(sorted(set(sys.modules) - before)))
"""


def test_the_client_imports_only_openai_and_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"openai", "veil"}
    for path in sorted((REPO / "veil" / "client").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                if name.split(".")[0] == "veil":
                    assert name.startswith("veil.client"), f"{path.name} imports {name}"
    loaded = subprocess.run(
        [sys.executable, "-c", LOADED_PAST_THE_SDK],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "veil.client._sync" in loaded  # the probe sees what the import loads
    outside = [n for n in loaded if not (n == "veil" or n.startswith("veil.client"))]
    assert [n for n in outside if n.split(".")[0] not in sys.stdlib_module_names] == []
    assert not {n.split(".")[0] for n in loaded} & SERVER
