"""Hidden server-side tools: the model calls them, Veil runs them, the client only sees the answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from config import Config, EngineConfig, MemoryConfig, ModelConfig, PipelineConfig
from eventstore.events import ModelCalled, ReplyCompleted, ToolLoopStopped, ToolsCalled, model_calls
from testkit.upstreams import FakeOpenAI, ToolCalls
from tests.harness import VeilThread
from tests.test_client_tools import TOOLS as CLIENT_TOOLS

script: dict[str, Any] = {}


def scripted(body: dict[str, Any]) -> str | ToolCalls:
    return script["reply"](body)  # type: ignore[no-any-return]


def tool_answers(body: dict[str, Any]) -> list[str]:
    return [m["content"] for m in body["messages"] if m["role"] == "tool"]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply=scripted) as fake:
        yield fake


@pytest.fixture(scope="module")
def veil(nats_url: str, upstream: FakeOpenAI) -> Iterator[VeilThread]:
    config = Config(
        engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
        pipelines={
            "default": PipelineConfig(
                engine="up", model="m", tools=["calculator", "current_time"], max_tool_steps=2
            )
        },
        models=[ModelConfig(name="veil", pipeline="default")],
        memory=MemoryConfig(enabled=False),
        nats_url=nats_url,
    )
    with VeilThread(config, nats_url) as server:
        yield server


@pytest.fixture
def client(veil: VeilThread, upstream: FakeOpenAI) -> Iterator[openai.OpenAI]:
    upstream.reset()
    with openai.OpenAI(base_url=veil.base_url, api_key="x", max_retries=0) as c:
        yield c


def calculate_then_answer(body: dict[str, Any]) -> str | ToolCalls:
    answers = tool_answers(body)
    if answers:
        return f"It is {answers[-1]}."
    return ToolCalls([("calculator", {"expression": "17 * 23"})])


def test_calculator_runs_behind_the_curtain(
    veil: VeilThread, client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    script["reply"] = calculate_then_answer
    reply = client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "What is 17 times 23?"}]
    )
    assert reply.choices[0].message.content == "It is 391."
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "stop"
    first, second = (r.body for r in upstream.requests)
    assert [t["function"]["name"] for t in first["tools"]] == ["calculator", "current_time"]
    assert second["messages"][-2]["tool_calls"][0]["function"]["name"] == "calculator"
    assert second["messages"][-1] == {
        "role": "tool",
        "content": "391",
        "tool_call_id": second["messages"][-2]["tool_calls"][0]["id"],
    }
    events = veil.events(reply.model_extra["session_id"])
    step = next(e for e in events if isinstance(e, ToolsCalled))
    assert (
        step.results[0].name == "calculator"
        and step.results[0].content == "391"
        and step.results[0].error is None
    )
    assert step.results[0].duration_ms >= 0
    # The call that asked for the tool, and the one that answered (recorded in the reply).
    assert sum(isinstance(e, ModelCalled) for e in events) == 1
    assert [c.engine for c in model_calls(events)] == ["up", "up"]


def test_streaming_client_never_sees_server_tool_calls(client: openai.OpenAI) -> None:
    script["reply"] = calculate_then_answer
    chunks = list(
        client.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": "17 times 23?"}], stream=True
        )
    )
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "It is 391."
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_failing_tool_is_fed_back_to_the_model(
    veil: VeilThread, client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    def broken_then_answer(body: dict[str, Any]) -> str | ToolCalls:
        answers = tool_answers(body)
        if answers:
            return f"Sorry: {answers[-1]}"
        return ToolCalls([("calculator", "{not json"), ("calculator", {"expression": "1/0"})])

    script["reply"] = broken_then_answer
    reply = client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "compute"}]
    )
    assert reply.choices[0].message.content == "Sorry: Error: division by zero"
    step = next(
        e for e in veil.events(reply.model_extra["session_id"]) if isinstance(e, ToolsCalled)
    )
    assert [r.error for r in step.results] == [
        "arguments are not valid JSON: Expecting property name enclosed in double quotes",
        "division by zero",
    ]


def test_the_step_limit_ends_with_the_best_answer_and_an_event(
    veil: VeilThread, client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    def always_calculate(body: dict[str, Any]) -> str | ToolCalls:
        if body.get("tool_choice") == "none":
            return f"Best so far: {tool_answers(body)[-1]}"
        return ToolCalls([("calculator", {"expression": f"{len(tool_answers(body))} + 1"})])

    script["reply"] = always_calculate
    reply = client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "count"}]
    )
    assert reply.choices[0].message.content == "Best so far: 2"
    events = veil.events(reply.model_extra["session_id"])
    assert sum(isinstance(e, ToolsCalled) for e in events) == 2
    stopped = [e for e in events if isinstance(e, ToolLoopStopped)]
    assert len(stopped) == 1 and stopped[0].steps == 2
    assert upstream.last_request.body["tool_choice"] == "none"


def test_client_and_server_tools_mixed(
    veil: VeilThread, client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    def both(body: dict[str, Any]) -> str | ToolCalls:
        answers = tool_answers(body)
        if len(answers) >= 2:
            return f"Done: {' / '.join(answers)}"
        return ToolCalls(
            [("calculator", {"expression": "2 + 2"}), ("get_weather", {"city": "Oslo"})]
        )

    script["reply"] = both
    first = client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "2+2 and Oslo?"}], tools=CLIENT_TOOLS
    )
    calls = first.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather"]  # the server's call stays hidden
    sid = first.model_extra["session_id"]
    second = client.chat.completions.create(
        model="veil",
        messages=[{"role": "tool", "tool_call_id": calls[0].id, "content": "snow"}],
        tools=CLIENT_TOOLS,
        extra_body={"session_id": sid},
    )
    assert second.choices[0].message.content == "Done: 4 / snow"
    roles = [m["role"] for m in upstream.last_request.body["messages"]]
    assert roles == ["user", "assistant", "tool", "tool"]
    replies = [e for e in veil.events(sid) if isinstance(e, ReplyCompleted)]
    assert [c.function.name for c in replies[0].tool_calls] == ["get_weather"]
    assert json.loads(
        upstream.last_request.body["messages"][1]["tool_calls"][0]["function"]["arguments"]
    ) == {"expression": "2 + 2"}


def test_replay_shows_the_hidden_steps(veil: VeilThread, client: openai.OpenAI) -> None:
    from testkit.procs import run_veil

    script["reply"] = calculate_then_answer
    reply = client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "17*23?"}]
    )
    out = run_veil(
        "replay", reply.model_extra["session_id"], env={"VEIL_NATS_URL": veil.nats_url}
    ).stdout
    assert 'calculator({"expression":"17 * 23"}) -> \'391\'' in out
