"""Client-side tools work exactly as OpenAI's: calls come back to the client, its answers continue the turn."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from config import (
    Config,
    EngineConfig,
    MemoryConfig,
    ModelConfig,
    PipelineConfig,
    local_model_available,
)
from testkit.upstreams import FakeAnthropic, FakeOpenAI, ToolCalls
from tests.harness import VeilThread

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


def weather_reply(body: dict[str, Any]) -> str | ToolCalls:
    answered = [m for m in body["messages"] if m["role"] == "tool"]
    if answered:
        return f"The weather: {answered[-1]['content']}"
    return ToolCalls([("get_weather", {"city": "Paris"})])


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply=weather_reply) as fake:
        yield fake


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(reply=weather_reply_anthropic) as fake:
        yield fake


def weather_reply_anthropic(body: dict[str, Any]) -> str | ToolCalls:
    results = [
        b["content"]
        for m in body["messages"]
        if isinstance(m["content"], list)
        for b in m["content"]
        if b.get("type") == "tool_result"
    ]
    if results:
        return f"The weather: {results[-1]}"
    return ToolCalls([("get_weather", {"city": "Paris"})])


@pytest.fixture(scope="module")
def veil(nats_url: str, upstream: FakeOpenAI, claude: FakeAnthropic) -> Iterator[VeilThread]:
    config = Config(
        engines={
            "up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x"),
            "claude": EngineConfig(kind="anthropic", base_url=claude.base_url, api_key="x"),
            "tiny": EngineConfig(kind="local"),
        },
        pipelines={
            "default": PipelineConfig(engine="up", model="m", retries=0),
            "claude": PipelineConfig(engine="claude", model="c", retries=0),
            "tiny": PipelineConfig(engine="tiny", model="t", retries=0),
        },
        models=[
            ModelConfig(name="veil", pipeline="default"),
            ModelConfig(name="veil-claude", pipeline="claude"),
            ModelConfig(name="veil-tiny", pipeline="tiny"),
        ],
        memory=MemoryConfig(enabled=False),
        nats_url=nats_url,
    )
    with VeilThread(config, nats_url) as server:
        yield server


@pytest.fixture
def client(veil: VeilThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=veil.base_url, api_key="x", max_retries=0) as c:
        yield c


def test_tool_call_round_trip_sending_only_the_tool_answer(
    client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    first = client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
        "city": "Paris"
    }
    assert upstream.last_request.body["tools"] == TOOLS
    sid = first.model_extra["session_id"]
    second = client.chat.completions.create(
        model="veil",
        messages=[{"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}],
        tools=TOOLS,
        extra_body={"session_id": sid},
    )
    assert second.choices[0].message.content == "The weather: sunny, 21 C"
    sent = upstream.last_request.body["messages"]
    assert sent[0] == {"role": "user", "content": "Weather in Paris?"}
    assert sent[1]["role"] == "assistant" and sent[1]["tool_calls"][0]["id"] == call.id
    assert sent[2] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": call.id}


def test_streamed_tool_calls_and_a_client_resending_everything(
    client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    history: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    with client.chat.completions.stream(model="veil", messages=history, tools=TOOLS) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    sid = final.model_extra["session_id"]
    # A stateless client sends the whole conversation back, as with OpenAI.
    history += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call.model_dump(include={"id", "type", "function"})],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "rain"},
    ]
    chunks = list(
        client.chat.completions.create(
            model="veil", messages=history, tools=TOOLS, stream=True, extra_body={"session_id": sid}
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == "The weather: rain"
    )
    sent = upstream.last_request.body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]  # nothing stored twice


def test_raw_stream_deltas_match_openai(veil: VeilThread) -> None:
    import urllib.request

    body = json.dumps(
        {
            "model": "veil",
            "messages": [{"role": "user", "content": "Weather?"}],
            "tools": TOOLS,
            "stream": True,
        }
    )
    request = urllib.request.Request(
        f"{veil.base_url}/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=20) as r:
        lines = [line for line in r.read().decode().splitlines() if line.startswith("data: {")]
    deltas = [json.loads(line[6:])["choices"][0] for line in lines]
    calls = [d["delta"]["tool_calls"][0] for d in deltas if "tool_calls" in d["delta"]]
    assert (
        calls[0]["index"] == 0 and calls[0]["id"] and calls[0]["function"]["name"] == "get_weather"
    )
    assert all("id" not in c for c in calls[1:])  # the SDK joins repeated ids
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
    assert deltas[-1]["finish_reason"] == "tool_calls"


@pytest.mark.skipif(not local_model_available(), reason="the 'local' extra is not installed")
def test_tools_on_an_engine_that_cannot_call_them_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="veil-tiny", messages=[{"role": "user", "content": "x"}], tools=TOOLS
        )
    assert info.value.body["param"] == "tools"


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_engine_translates_tools_both_ways(
    client: openai.OpenAI, claude: FakeAnthropic, stream: bool
) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    if stream:
        with client.chat.completions.stream(
            model="veil-claude", messages=messages, tools=TOOLS
        ) as s:
            for _ in s:
                pass
            first = s.get_final_completion()
    else:
        first = client.chat.completions.create(
            model="veil-claude", messages=messages, tools=TOOLS, tool_choice="required"
        )
        assert claude.last_request.body["tool_choice"] == {"type": "any"}
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
        "city": "Paris"
    }
    sent_tools = claude.last_request.body["tools"]
    assert sent_tools == [
        {
            "name": "get_weather",
            "input_schema": TOOLS[0]["function"]["parameters"],
            "description": "The weather in a city.",
        }
    ]
    second = client.chat.completions.create(
        model="veil-claude",
        messages=[{"role": "tool", "tool_call_id": call.id, "content": "windy"}],
        tools=TOOLS,
        extra_body={"session_id": first.model_extra["session_id"]},
    )
    assert second.choices[0].message.content == "The weather: windy"
    sent = claude.last_request.body["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": call.id, "name": "get_weather", "input": {"city": "Paris"}}
        ],
    }
    assert sent[2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "windy"}],
    }


def test_tool_message_without_its_call_id_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="veil", messages=[{"role": "tool", "content": "x"}])  # type: ignore[list-item]
    assert info.value.body["param"] == "messages[0].tool_call_id"
