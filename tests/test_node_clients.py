"""Both doors through the official Node clients, unmodified: `openai` on Chat Completions and
`@anthropic-ai/sdk` on Messages, streamed and whole, with a client tool, over real HTTP to
real NATS actors and a fake OpenAI upstream.

Each script in tests/node/ runs once per module and prints a JSON summary of what its client
saw; the tests check that summary, what the upstream received and what Veil's log holds. The
clients are the versions tests/node/package-lock.json pins, installed with `npm ci` when
tests/node/node_modules does not hold them. Without node and npm the module is skipped,
except in CI (CI set), where .ci/run installs them and a missing one is a failure.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest

from config import ApiKey, Config, EngineConfig, MemoryConfig, ModelConfig, PipelineConfig
from eventstore.events import ChatMessage, ReplyCompleted, SessionOpened, TurnStarted
from eventstore.jetstream import JetStreamEventStore
from testkit.upstreams import FakeOpenAI, RecordedRequest, ToolCalls
from tests.harness import VeilThread

NODE_DIR = Path(__file__).resolve().parent / "node"
PERSONA = "You are Veil, a careful assistant."
# One tenant per script: the sessions a tenant holds are the ones its script opened.
OPENAI_TENANT, ANTHROPIC_TENANT = "node-openai", "node-anthropic"
RESPONSES_TENANT = "node-responses"
OPENAI_KEY = ApiKey(key="sk-node-openai", tenant=OPENAI_TENANT)
ANTHROPIC_KEY = ApiKey(key="sk-node-anthropic", tenant=ANTHROPIC_TENANT)
RESPONSES_KEY = ApiKey(key="sk-node-responses", tenant=RESPONSES_TENANT)
# tests/node/openai_chat.mjs sends this, the chat door's shape of its tool.
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


def _tools() -> list[str]:
    """node and npm, or a skip (outside CI) or a failure (in CI) saying which is missing."""
    found = [shutil.which("node"), shutil.which("npm")]
    if None in found:
        why = "node and npm are needed to run the official Node clients (tests/node)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; .ci/run installs them", pytrace=False)
        pytest.skip(why)
    return [str(path) for path in found]


def _installed(package: str) -> str | None:
    manifest = NODE_DIR / "node_modules" / package / "package.json"
    return json.loads(manifest.read_text())["version"] if manifest.exists() else None


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the pinned clients installed in tests/node/node_modules."""
    node, npm = _tools()
    pinned: dict[str, str] = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    if any(_installed(name) != version for name, version in pinned.items()):
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            check=False,
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"npm ci in {NODE_DIR} failed:\n{done.stdout}{done.stderr}"
    assert {name: _installed(name) for name in pinned} == pinned
    return node


def _last_user(body: dict[str, Any]) -> str:
    return next(str(m["content"]) for m in reversed(body["messages"]) if m["role"] == "user")


def model(body: dict[str, Any]) -> str | ToolCalls:
    """Echo the last user message; offered tools, call the weather until its result is in."""
    if not body.get("tools"):
        return f"echo: {_last_user(body)}"
    results = [m["content"] for m in body["messages"] if m["role"] == "tool"]
    if results:
        return f"The weather: {results[-1]}"
    return ToolCalls([("get_weather", {"city": "Paris"})], text="Let me look.")


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key="sk-upstream", reply=model) as fake:
        yield fake


@pytest.fixture(scope="module")
def veil(nats_url: str, upstream: FakeOpenAI) -> Iterator[VeilThread]:
    config = Config(
        keys=[OPENAI_KEY, ANTHROPIC_KEY, RESPONSES_KEY],
        engines={
            "up": EngineConfig(
                kind="openai", base_url=upstream.base_url, api_key="sk-upstream", timeout=10.0
            )
        },
        pipelines={
            "default": PipelineConfig(
                engine="up", model="upstream-model", system_prompt=PERSONA, retries=0
            )
        },
        models=[ModelConfig(name="veil", pipeline="default")],
        # No fact extraction: every request the upstream gets is a turn of a script.
        memory=MemoryConfig(enabled=False),
        nats_url=nats_url,
    )
    with VeilThread(config, nats_url) as server:
        yield server


@dataclass
class Run:
    """One script's summary, and the chat requests the upstream received while it ran."""

    summary: dict[str, Any]
    requests: list[RecordedRequest]

    def request_ending(self, role: str, content: str) -> dict[str, Any]:
        """The one upstream request whose last message is this one."""
        found: list[dict[str, Any]] = [
            r.body
            for r in self.requests
            if r.body["messages"][-1]["role"] == role
            and r.body["messages"][-1]["content"] == content
        ]
        assert len(found) == 1, f"{len(found)} upstream requests end with {role} {content!r}"
        return found[0]


def _run(node: str, script: str, veil: VeilThread, upstream: FakeOpenAI, key: ApiKey) -> Run:
    upstream.reset()
    done = subprocess.run(
        [node, script],
        check=False,
        cwd=NODE_DIR,
        env={**os.environ, "VEIL_URL": f"http://127.0.0.1:{veil.port}", "VEIL_KEY": key.key},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"node {script} failed:\n{done.stdout}{done.stderr}"
    chats = [r for r in upstream.requests if r.path == "/v1/chat/completions"]
    assert all(r.outcome == "ok" for r in chats)
    return Run(json.loads(done.stdout), chats)


@pytest.fixture(scope="module")
def openai_run(node: str, veil: VeilThread, upstream: FakeOpenAI) -> Run:
    return _run(node, "openai_chat.mjs", veil, upstream, OPENAI_KEY)


@pytest.fixture(scope="module")
def anthropic_run(node: str, veil: VeilThread, upstream: FakeOpenAI) -> Run:
    return _run(node, "anthropic_messages.mjs", veil, upstream, ANTHROPIC_KEY)


@pytest.fixture(scope="module")
def responses_run(node: str, veil: VeilThread, upstream: FakeOpenAI) -> Run:
    return _run(node, "openai_responses.mjs", veil, upstream, RESPONSES_KEY)


def sessions_of(veil: VeilThread, tenant: str) -> set[str]:
    """Every session the tenant has in Veil's log."""

    async def read() -> set[str]:
        nc = await nats.connect(veil.nats_url)
        try:
            store = JetStreamEventStore(nc.jetstream(), nc)
            return {s.session_id for s in await store.sessions() if s.tenant == tenant}
        finally:
            await nc.close()

    return veil.call(read())


def turns(veil: VeilThread, sid: str) -> list[TurnStarted]:
    """The session's turns, after checking that its log opens it once and answers each."""
    events = veil.events(sid)
    assert isinstance(events[0], SessionOpened)
    assert sum(isinstance(e, SessionOpened) for e in events) == 1
    started = [e for e in events if isinstance(e, TurnStarted)]
    replied = [e for e in events if isinstance(e, ReplyCompleted)]
    assert [r.turn_id for r in replied] == [t.turn_id for t in started]
    return started


# --- the openai client on Chat Completions ------------------------------------------------------


def test_openai_client_version(openai_run: Run) -> None:
    pinned = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]["openai"]
    assert openai_run.summary["version"] == pinned


def test_openai_a_conversation_whole_then_streamed(openai_run: Run, veil: VeilThread) -> None:
    first = openai_run.summary["conversation"]["first"]
    second = openai_run.summary["conversation"]["second"]
    assert first["object"] == "chat.completion" and first["finish_reason"] == "stop"
    assert first["content"] == "echo: My name is Ann." and first["total_tokens"] > 0
    sid = first["session_id"]
    assert sid and first["header"] == sid
    # The stream continued the session named in its body: every chunk says so.
    assert second["content"] == "echo: I like tea." and second["finish_reason"] == "stop"
    assert second["chunks"] > 2 and second["session_ids"] == [sid] and second["header"] == sid
    assert openai_run.request_ending("user", "I like tea.")["messages"] == [
        {"role": "system", "content": PERSONA},
        {"role": "user", "content": "My name is Ann."},
        {"role": "assistant", "content": "echo: My name is Ann."},
        {"role": "user", "content": "I like tea."},
    ]
    started = turns(veil, sid)
    assert [t.streaming for t in started] == [False, True]
    assert [t.messages for t in started] == [
        [ChatMessage(role="user", content="My name is Ann.")],
        [ChatMessage(role="user", content="I like tea.")],
    ]


@pytest.mark.parametrize("mode", ["whole", "streamed"])
def test_openai_a_tool_round_trip(openai_run: Run, veil: VeilThread, mode: str) -> None:
    asked = openai_run.summary["tools"][mode]["asked"]
    answered = openai_run.summary["tools"][mode]["answered"]
    assert asked["finish_reason"] == "tool_calls"
    call = asked["call"]
    assert call["id"] and call["name"] == "get_weather" and call["arguments"] == {"city": "Paris"}
    result = f"sunny, 21 C ({mode})"
    assert answered == {
        "session_id": asked["session_id"],
        "finish_reason": "stop",
        "content": f"The weather: {result}",
    }
    # The script sent only the tool's result: the model got it after its own call.
    sent = openai_run.request_ending("tool", result)
    assert sent["tools"] == TOOLS
    assert sent["messages"][1:-1] == [
        {"role": "user", "content": f"Weather in Paris? ({mode})"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
    ]
    assert sent["messages"][-1] == {"role": "tool", "content": result, "tool_call_id": call["id"]}
    started = turns(veil, asked["session_id"])
    assert [t.streaming for t in started] == [mode == "streamed"] * 2
    assert started[1].messages == [
        ChatMessage(role="tool", content=result, tool_call_id=call["id"])
    ]


def test_openai_one_session_per_conversation(openai_run: Run, veil: VeilThread) -> None:
    summary = openai_run.summary
    conversations = {
        summary["conversation"]["first"]["session_id"],
        *(summary["tools"][mode]["asked"]["session_id"] for mode in ("whole", "streamed")),
    }
    assert len(conversations) == 3
    assert sessions_of(veil, OPENAI_TENANT) == conversations
    # Two turns each, and nothing else reached the model (the refused requests did not).
    assert len(openai_run.requests) == 6


def test_openai_errors_are_the_clients_classes(openai_run: Run) -> None:
    errors = openai_run.summary["errors"]
    assert errors["wrong_key"] == {
        "class": "AuthenticationError",
        "is_api_error": True,
        "status": 401,
    }
    for refused in (errors["unknown_model"], errors["unknown_model_streamed"]):
        assert refused == {"class": "NotFoundError", "is_api_error": True, "status": 404}


# --- the @anthropic-ai/sdk client on Messages ---------------------------------------------------


def test_anthropic_client_version(anthropic_run: Run) -> None:
    pinned = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    assert anthropic_run.summary["version"] == pinned["@anthropic-ai/sdk"]


def test_anthropic_a_resent_conversation_is_one_session(
    anthropic_run: Run, veil: VeilThread
) -> None:
    conversation = anthropic_run.summary["conversation"]
    first, second, third = conversation["first"], conversation["second"], conversation["third"]
    sid = first["session_id"]
    assert sid and first["id"].startswith("msg_") and first["type"] == "message"
    for message, said in ((first, "My name is Ann."), (second, "I like tea.")):
        assert message["stop_reason"] == "end_turn"
        assert message["content"] == [{"type": "text", "text": f"echo: {said}"}]
        assert message["usage"]["input_tokens"] > 0 and message["usage"]["output_tokens"] > 0
    # The stream helper's text events add up to its final message, which message_start named.
    assert len(second["texts"]) > 1 and "".join(second["texts"]) == "echo: I like tea."
    assert [m["header"] for m in (first, second, third)] == [sid] * 3
    assert [m["session_id"] for m in (first, second, third)] == [sid] * 3
    # The model saw the conversation once, though the client resent it each time.
    assert anthropic_run.request_ending("user", "What is my name?")["messages"] == [
        {"role": "system", "content": PERSONA},
        {"role": "user", "content": "My name is Ann."},
        {"role": "assistant", "content": "echo: My name is Ann."},
        {"role": "user", "content": "I like tea."},
        {"role": "assistant", "content": "echo: I like tea."},
        {"role": "user", "content": "What is my name?"},
    ]
    started = turns(veil, sid)
    assert [t.streaming for t in started] == [False, True, False]
    assert [[m.content for m in t.messages] for t in started] == [
        ["My name is Ann."],
        ["I like tea."],
        ["What is my name?"],
    ]


def test_anthropic_count_tokens(anthropic_run: Run) -> None:
    schema = json.dumps(TOOLS[0]["function"]["parameters"], separators=(",", ":"))
    chars = len("Be brief.") + len("How many tokens is this?")
    chars += len("get_weather") + len("The weather in a city.") + len(schema)
    assert anthropic_run.summary["count_tokens"] == {"input_tokens": math.ceil(chars / 4)}


@pytest.mark.parametrize("mode", ["whole", "streamed"])
def test_anthropic_a_tool_use_round_trip(anthropic_run: Run, veil: VeilThread, mode: str) -> None:
    asked = anthropic_run.summary["tools"][mode]["asked"]
    answered = anthropic_run.summary["tools"][mode]["answered"]
    sid = asked["session_id"]
    assert asked["stop_reason"] == "tool_use" and asked["header"] == sid
    text, call = asked["content"]
    assert text == {"type": "text", "text": "Let me look."}
    assert call["type"] == "tool_use" and call["id"] and call["name"] == "get_weather"
    assert call["input"] == {"city": "Paris"}
    result = f"18 C ({mode})"
    assert answered["stop_reason"] == "end_turn"
    assert answered["content"] == [{"type": "text", "text": f"The weather: {result}"}]
    assert answered["session_id"] == answered["header"] == sid
    # The resent history was recognised: the model got its call once, then the result.
    sent = anthropic_run.request_ending("tool", result)
    assert sent["tools"] == TOOLS
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "tool"]
    assert sent["messages"][2]["tool_calls"][0]["id"] == call["id"]
    assert sent["messages"][3] == {"role": "tool", "content": result, "tool_call_id": call["id"]}
    started = turns(veil, sid)
    assert [t.streaming for t in started] == [mode == "streamed"] * 2
    assert started[1].messages == [
        ChatMessage(role="tool", content=result, tool_call_id=call["id"])
    ]


def test_anthropic_one_session_per_conversation(anthropic_run: Run, veil: VeilThread) -> None:
    summary = anthropic_run.summary
    conversations = {
        summary["conversation"]["first"]["session_id"],
        *(summary["tools"][mode]["asked"]["session_id"] for mode in ("whole", "streamed")),
    }
    assert len(conversations) == 3
    assert sessions_of(veil, ANTHROPIC_TENANT) == conversations
    # Three turns and two twice; count_tokens and the refused requests never reach the model.
    assert len(anthropic_run.requests) == 7


def test_anthropic_errors_are_the_clients_classes(anthropic_run: Run) -> None:
    errors = anthropic_run.summary["errors"]
    assert errors["wrong_key"] == {
        "class": "AuthenticationError",
        "is_api_error": True,
        "status": 401,
        "type": "authentication_error",
    }
    for name in ("unknown_model", "unknown_model_streamed", "unknown_model_count_tokens"):
        assert errors[name] == {
            "class": "NotFoundError",
            "is_api_error": True,
            "status": 404,
            "type": "not_found_error",
        }, name


# --- the openai client on Responses and Conversations -------------------------------------------


def test_responses_a_chain_whole_then_streamed(responses_run: Run) -> None:
    chain = responses_run.summary["chain"]
    assert chain["first"]["object"] == "response" and chain["first"]["status"] == "completed"
    assert chain["first"]["id"].startswith("resp_")
    assert chain["second"]["text"] == "echo: What is my name?"
    assert chain["second"]["usage"]["total_tokens"] > 0
    # previous_response_id continued the session: the model saw the first turn.
    seen = responses_run.request_ending("user", "What is my name?")["messages"]
    assert {"role": "user", "content": "My name is Bea."} in seen
    streamed = chain["streamed"]
    for kind in ("response.created", "response.output_text.delta", "response.completed"):
        assert kind in streamed["types"], streamed["types"]
    assert streamed["text"] == streamed["completed_text"] == "echo: Say it again, streamed."
    assert chain["retrieved"] == {"id": chain["second"]["id"], "text": chain["second"]["text"]}
    earlier = responses_run.request_ending("user", "Say it again, streamed.")["messages"]
    assert {"role": "user", "content": "My name is Bea."} in earlier


def test_responses_a_function_tool_round_trip(responses_run: Run) -> None:
    tool = responses_run.summary["tool"]
    assert tool["call"]["name"] == "get_weather" and tool["call"]["arguments"] == {"city": "Paris"}
    assert tool["answer"] == "The weather: sunny, 22 C (node)"
    answered = responses_run.request_ending("tool", "sunny, 22 C (node)")["messages"]
    assert answered[-1]["tool_call_id"] == tool["call"]["call_id"]


def test_conversations_items_reach_the_model(responses_run: Run) -> None:
    conversation = responses_run.summary["conversation"]
    assert conversation["metadata"] == {"topic": "colours"}
    seen = responses_run.request_ending("user", "Which colour?")["messages"]
    assert {"role": "user", "content": "Remember the colour teal."} in seen
    assert conversation["items"] == ["assistant", "user", "user"]  # newest first, as OpenAI lists
    assert conversation["deleted"] is True
    assert conversation["gone"] == {"class": "NotFoundError", "status": 404}


def test_responses_errors_are_the_clients_classes(responses_run: Run) -> None:
    errors = responses_run.summary["errors"]
    assert errors["wrong_key"] == {"class": "AuthenticationError", "status": 401}
    assert errors["unknown_model"] == {"class": "NotFoundError", "status": 404}
    assert errors["unknown_response"] == {"class": "NotFoundError", "status": 404}
