"""The fake upstreams, checked with the official openai / anthropic SDKs as clients."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pytest

from testkit.upstreams import (
    FakeAnthropic,
    FakeOpenAI,
    Fault,
    ToolCalls,
    split_arguments,
    split_tokens,
)

KEY = "sk-test-key"
USER = [{"role": "user", "content": "hello big world"}]
ECHO = "echo: hello big world"


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


async def async_wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- fixtures: sync SDK + fake in a thread, async SDK + fake on the test loop -----------------


@pytest.fixture
def oai_up() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=KEY) as up:
        yield up


@pytest.fixture
def oai(oai_up: FakeOpenAI) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=oai_up.base_url, api_key=KEY, max_retries=0) as client:
        yield client


@pytest.fixture
async def aoai_up() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=KEY) as up:
        yield up


@pytest.fixture
async def aoai(aoai_up: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=aoai_up.base_url, api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture
def ant_up() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=KEY) as up:
        yield up


@pytest.fixture
def ant(ant_up: FakeAnthropic) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=ant_up.base_url, api_key=KEY, max_retries=0) as client:
        yield client


@pytest.fixture
async def aant_up() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic(api_key=KEY) as up:
        yield up


@pytest.fixture
async def aant(aant_up: FakeAnthropic) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=aant_up.base_url, api_key=KEY, max_retries=0
    ) as client:
        yield client


def test_split_tokens_keeps_all_text() -> None:
    assert split_tokens("echo: hi  there ") == ["echo:", " hi", "  there "]
    assert split_tokens("") == []
    assert "".join(split_tokens(" a\nb  c ")) == " a\nb  c "


# -- OpenAI ----------------------------------------------------------------------------------


def test_openai_completion_and_recording(oai_up: FakeOpenAI, oai: openai.OpenAI) -> None:
    assert oai_up.base_url == f"http://127.0.0.1:{oai_up.port}/v1"
    messages = [{"role": "system", "content": "be brief"}, *USER]
    r = oai.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=50)

    assert r.object == "chat.completion"
    assert r.model == "gpt-4o-mini"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ECHO
    assert r.choices[0].message.refusal is None
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 4, 9)

    req = oai_up.last_request
    assert req.method == "POST" and req.path == "/v1/chat/completions"
    assert req.body == {"model": "gpt-4o-mini", "messages": messages, "max_tokens": 50}
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["user-agent"].startswith("OpenAI/Python")
    assert req.outcome == "ok"
    assert len(oai_up.requests) == 1


def test_openai_stream_with_usage(oai_up: FakeOpenAI, oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="gpt-4o", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    first, *middle, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert [c.choices[0].delta.content for c in middle] == split_tokens(ECHO)
    assert len(middle) > 1
    assert finish.choices[0].finish_reason == "stop" and finish.choices[0].delta.content is None
    assert all(c.usage is None and c.choices[0].finish_reason is None for c in [first, *middle])
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == len(middle)
    assert oai_up.last_request.body["stream_options"] == {"include_usage": True}


async def test_openai_async_stream(aoai_up: FakeOpenAI, aoai: openai.AsyncOpenAI) -> None:
    stream = await aoai.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ECHO
    assert aoai_up.last_request.body["stream"] is True


async def test_openai_max_tokens_truncates(aoai_up: FakeOpenAI, aoai: openai.AsyncOpenAI) -> None:
    r = await aoai.chat.completions.create(model="m", messages=USER, max_tokens=2)
    assert r.choices[0].message.content == "echo: hello"
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 2

    stream = await aoai.chat.completions.create(
        model="m", messages=USER, max_completion_tokens=1, stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo:"
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_openai_custom_reply(aoai_up: FakeOpenAI, aoai: openai.AsyncOpenAI) -> None:
    aoai_up.reply = "Fixed answer here."
    r = await aoai.chat.completions.create(model="m", messages=USER)
    assert r.choices[0].message.content == "Fixed answer here."
    aoai_up.reply = lambda body: f"model was {body['model']}"
    r = await aoai.chat.completions.create(model="gpt-x", messages=USER)
    assert r.choices[0].message.content == "model was gpt-x"


def test_openai_rate_limit(oai_up: FakeOpenAI, oai: openai.OpenAI) -> None:
    oai_up.fail_next(429, "slow down please", retry_after=2)
    with pytest.raises(openai.RateLimitError) as info:
        oai.chat.completions.create(model="m", messages=USER)
    err = info.value
    assert err.status_code == 429
    assert "slow down please" in err.message
    assert err.body == {
        "message": "slow down please",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert err.response.headers["retry-after"] == "2"
    assert oai_up.last_request.outcome == "error"
    # consumed: the next request is fine
    assert oai.chat.completions.create(model="m", messages=USER).choices[0].message.content == ECHO


async def test_openai_server_error(aoai_up: FakeOpenAI, aoai: openai.AsyncOpenAI) -> None:
    aoai_up.fail_next(500)
    with pytest.raises(openai.InternalServerError) as info:
        await aoai.chat.completions.create(model="m", messages=USER)
    assert info.value.status_code == 500
    assert "The server had an error" in info.value.message


async def test_openai_faults_consumed_in_order(
    aoai_up: FakeOpenAI, aoai: openai.AsyncOpenAI
) -> None:
    aoai_up.fail_next(503, times=2)
    aoai_up.fail_next(400, "bad thing")
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await aoai.chat.completions.create(model="m", messages=USER)
    with pytest.raises(openai.BadRequestError, match="bad thing"):
        await aoai.chat.completions.create(model="m", messages=USER)
    await aoai.chat.completions.create(model="m", messages=USER)
    assert [r.outcome for r in aoai_up.requests] == ["error", "error", "error", "ok"]


async def test_openai_sticky_fault_until_reset(
    aoai_up: FakeOpenAI, aoai: openai.AsyncOpenAI
) -> None:
    aoai_up.fail_next(502, times=None)
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            await aoai.chat.completions.create(model="m", messages=USER)
    aoai_up.reset()
    assert aoai_up.requests == []
    await aoai.chat.completions.create(model="m", messages=USER)


def test_openai_timeout_sync(oai_up: FakeOpenAI, oai: openai.OpenAI) -> None:
    oai_up.delay(2.0)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        oai.chat.completions.create(model="m", messages=USER, timeout=0.2)
    assert time.monotonic() - started < 1.5
    # the abandoned request's handler is cancelled when the client drops the connection
    wait_until(lambda: oai_up.requests[0].outcome == "disconnected")
    assert oai.chat.completions.create(model="m", messages=USER).choices[0].message.content == ECHO


async def test_openai_timeout_async(aoai_up: FakeOpenAI, aoai: openai.AsyncOpenAI) -> None:
    aoai_up.delay(2.0)
    with pytest.raises(openai.APITimeoutError):
        await aoai.chat.completions.create(model="m", messages=USER, stream=True, timeout=0.2)
    await async_wait_until(lambda: aoai_up.requests[0].outcome == "disconnected")


def test_openai_broken_stream_sync(oai_up: FakeOpenAI, oai: openai.OpenAI) -> None:
    oai_up.break_stream_after(2)
    received = []
    # openai wraps the transport error (httpx2.RemoteProtocolError) in APIConnectionError
    with pytest.raises(openai.APIConnectionError) as info:
        for chunk in oai.chat.completions.create(model="m", messages=USER, stream=True):
            received.append(chunk.choices[0].delta.content)
    assert isinstance(info.value.__cause__, httpx2.RemoteProtocolError)
    assert received == ["", *split_tokens(ECHO)[:2]]
    assert oai_up.last_request.outcome == "broken"


async def test_openai_broken_stream_async(aoai_up: FakeOpenAI, aoai: openai.AsyncOpenAI) -> None:
    aoai_up.inject(Fault(break_after=1, token_delay=0.01))
    stream = await aoai.chat.completions.create(model="m", messages=USER, stream=True)
    received = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 2


async def test_openai_dropped_non_stream(aoai_up: FakeOpenAI, aoai: openai.AsyncOpenAI) -> None:
    aoai_up.break_stream_after(0)
    with pytest.raises(openai.APIConnectionError):
        await aoai.chat.completions.create(model="m", messages=USER)


async def test_openai_client_disconnect_mid_stream(
    aoai_up: FakeOpenAI, aoai: openai.AsyncOpenAI
) -> None:
    aoai_up.token_delay(0.2)
    stream = await aoai.chat.completions.create(model="m", messages=USER, stream=True)
    first = await stream.__anext__()
    assert first.choices[0].delta.role == "assistant"
    await stream.close()
    await async_wait_until(lambda: aoai_up.last_request.outcome == "disconnected")


async def test_openai_auth_and_models(aoai_up: FakeOpenAI) -> None:
    async with openai.AsyncOpenAI(base_url=aoai_up.base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.chat.completions.create(model="m", messages=USER)
    assert info.value.code == "invalid_api_key"
    async with openai.AsyncOpenAI(base_url=aoai_up.base_url, api_key=KEY, max_retries=0) as ok:
        models = [m.id async for m in ok.models.list()]
    assert models == list(aoai_up.models)
    assert aoai_up.last_request.path == "/v1/models" and aoai_up.last_request.body is None


async def test_openai_rejects_bad_body(aoai_up: FakeOpenAI) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            aoai_up.base_url + "/chat/completions",
            data=b"not json",
            headers={"Authorization": f"Bearer {KEY}"},
        ) as resp,
    ):
        assert resp.status == 400
        body = await resp.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert aoai_up.last_request.body is None


def test_openai_separate_process(repo_root: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "testkit.upstreams", "openai", "--port", "0"],
        cwd=repo_root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.removeprefix("listening on ")
        with openai.OpenAI(base_url=url + "/v1", api_key="any", max_retries=0) as client:
            r = client.chat.completions.create(model="m", messages=USER)
        assert r.choices[0].message.content == ECHO
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0
        if proc.stdout is not None:
            proc.stdout.close()


# -- Anthropic -------------------------------------------------------------------------------


def test_anthropic_message_and_recording(ant_up: FakeAnthropic, ant: anthropic.Anthropic) -> None:
    assert ant_up.base_url == f"http://127.0.0.1:{ant_up.port}"
    m = ant.messages.create(model="claude-x", max_tokens=100, system="be brief", messages=USER)
    assert m.type == "message" and m.role == "assistant" and m.model == "claude-x"
    assert len(m.content) == 1 and m.content[0].type == "text"
    assert m.content[0].text == ECHO
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert (m.usage.input_tokens, m.usage.output_tokens) == (5, 4)

    req = ant_up.last_request
    assert req.path == "/v1/messages"
    assert req.body == {
        "model": "claude-x",
        "max_tokens": 100,
        "system": "be brief",
        "messages": USER,
    }
    assert "anthropic-version" in req.headers
    # anthropic SDK 2.x sends api_key as a Bearer token, not x-api-key
    assert req.headers["authorization"] == f"Bearer {KEY}"


def test_anthropic_accepts_x_api_key(ant_up: FakeAnthropic) -> None:
    with anthropic.Anthropic(
        base_url=ant_up.base_url, api_key=None, default_headers={"x-api-key": KEY}, max_retries=0
    ) as client:
        m = client.messages.create(model="c", max_tokens=10, messages=USER)
    assert m.content[0].text == ECHO  # type: ignore[union-attr]
    assert ant_up.last_request.headers["x-api-key"] == KEY


def test_anthropic_raw_stream_events(ant_up: FakeAnthropic, ant: anthropic.Anthropic) -> None:
    events = list(ant.messages.create(model="c", max_tokens=100, messages=USER, stream=True))
    types = [e.type for e in events]
    n = len(split_tokens(ECHO))
    # (ping is on the wire but the SDK swallows it)
    assert types == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * n,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start, delta = events[0], events[-2]
    assert start.type == "message_start" and start.message.usage.input_tokens == 3
    assert delta.type == "message_delta"
    assert delta.delta.stop_reason == "end_turn" and delta.usage.output_tokens == n
    text = "".join(
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text == ECHO


def test_anthropic_stream_helper(ant_up: FakeAnthropic, ant: anthropic.Anthropic) -> None:
    with ant.messages.stream(model="c", max_tokens=100, messages=USER) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces == split_tokens(ECHO)
    assert final.content[0].text == ECHO  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == len(pieces)


def test_anthropic_wire_format(ant_up: FakeAnthropic) -> None:
    """The raw SSE text, as the real API sends it (event: lines, ping after block start)."""
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    body = {"model": "c", "max_tokens": 1, "messages": USER, "stream": True}
    r = httpx2.post(ant_up.url + "/v1/messages", json=body, headers=headers)
    assert r.headers["content-type"].startswith("text/event-stream")
    names = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert '"stop_reason":"max_tokens"' in r.text


async def test_anthropic_async(aant_up: FakeAnthropic, aant: anthropic.AsyncAnthropic) -> None:
    m = await aant.messages.create(model="c", max_tokens=2, messages=USER)
    assert m.content[0].text == "echo: hello"  # type: ignore[union-attr]
    assert m.stop_reason == "max_tokens"

    async with aant.messages.stream(model="c", max_tokens=100, messages=USER) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == ECHO and final.stop_reason == "end_turn"

    stream2 = await aant.messages.create(model="c", max_tokens=100, messages=USER, stream=True)
    assert [e.type async for e in stream2][-1] == "message_stop"


def test_anthropic_rate_limit(ant_up: FakeAnthropic, ant: anthropic.Anthropic) -> None:
    ant_up.fail_next(429, "too many", retry_after=1.5)
    with pytest.raises(anthropic.RateLimitError) as info:
        ant.messages.create(model="c", max_tokens=10, messages=USER)
    err = info.value
    assert err.status_code == 429 and "too many" in err.message
    assert err.type == "rate_limit_error" and err.api_message == "too many"
    assert isinstance(err.body, dict) and err.body["type"] == "error"
    assert err.response.headers["retry-after"] == "1.5"
    assert err.request_id is not None


async def test_anthropic_server_errors(
    aant_up: FakeAnthropic, aant: anthropic.AsyncAnthropic
) -> None:
    aant_up.fail_next(529)
    aant_up.fail_next(500)
    with pytest.raises(anthropic.OverloadedError):
        await aant.messages.create(model="c", max_tokens=10, messages=USER)
    with pytest.raises(anthropic.InternalServerError) as info:
        await aant.messages.create(model="c", max_tokens=10, messages=USER)
    assert info.value.type == "api_error"


def test_anthropic_timeout(ant_up: FakeAnthropic, ant: anthropic.Anthropic) -> None:
    ant_up.delay(2.0)
    with pytest.raises(anthropic.APITimeoutError):
        ant.messages.create(model="c", max_tokens=10, messages=USER, timeout=0.2)


# anthropic (unlike openai) lets the transport error out of a stream unwrapped
BROKEN_STREAM_ERRORS = (anthropic.APIConnectionError, httpx2.RemoteProtocolError)


def test_anthropic_broken_stream(ant_up: FakeAnthropic, ant: anthropic.Anthropic) -> None:
    ant_up.break_stream_after(1)
    seen = []
    with pytest.raises(BROKEN_STREAM_ERRORS):
        for event in ant.messages.create(model="c", max_tokens=10, messages=USER, stream=True):
            seen.append(event.type)
    assert seen == ["message_start", "content_block_start", "content_block_delta"]
    assert ant_up.last_request.outcome == "broken"


async def test_anthropic_broken_stream_helper_async(
    aant_up: FakeAnthropic, aant: anthropic.AsyncAnthropic
) -> None:
    aant_up.break_stream_after(2)
    with pytest.raises(BROKEN_STREAM_ERRORS):
        async with aant.messages.stream(model="c", max_tokens=10, messages=USER) as stream:
            await stream.get_final_message()


async def test_anthropic_auth_and_version(aant_up: FakeAnthropic) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=aant_up.base_url, api_key="wrong", max_retries=0
    ) as bad:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await bad.messages.create(model="c", max_tokens=10, messages=USER)
    assert info.value.type == "authentication_error"

    async with (
        aiohttp.ClientSession() as http,
        http.post(
            aant_up.url + "/v1/messages",
            json={"model": "c", "max_tokens": 5, "messages": USER},
            headers={"x-api-key": KEY},
        ) as resp,
    ):
        assert resp.status == 400
        body = await resp.json()
    assert body["type"] == "error"
    assert body["error"] == {
        "type": "invalid_request_error",
        "message": "anthropic-version: header is required",
    }


async def test_anthropic_count_tokens_and_models(
    aant_up: FakeAnthropic, aant: anthropic.AsyncAnthropic
) -> None:
    counted = await aant.messages.count_tokens(model="c", messages=USER, system="one two")
    assert counted.input_tokens == 5
    models = [m.id async for m in aant.models.list()]
    assert models == list(aant_up.models)


async def test_both_on_one_loop_in_parallel() -> None:
    """Several fakes and concurrent requests on the test loop."""
    async with (
        FakeOpenAI() as up1,
        FakeOpenAI(reply="two") as up2,
        openai.AsyncOpenAI(base_url=up1.base_url, api_key="x", max_retries=0) as c1,
        openai.AsyncOpenAI(base_url=up2.base_url, api_key="x", max_retries=0) as c2,
    ):
        results = await asyncio.gather(
            *(c.chat.completions.create(model="m", messages=USER) for c in [c1, c2] * 5)
        )
    assert [r.choices[0].message.content for r in results] == [ECHO, "two"] * 5
    assert len(up1.requests) == len(up2.requests) == 5


# -- tool calls ------------------------------------------------------------------------------

WEATHER = ("get_weather", {"city": "Paris"})
WEATHER_ARGS = '{"city":"Paris"}'  # how a dict is sent: compact JSON
OAI_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
OAI_STRICT_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]
ANT_TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]


def test_split_arguments_keeps_all_text() -> None:
    assert split_arguments(WEATHER_ARGS) == ['{"', "city", '":"', "Paris", '"}']
    for text in ['{"a": [1, 2.5], "b": "x y"}', '{"city": "Par', "", "{not json"]:
        assert "".join(split_arguments(text)) == text


def test_tool_calls_empty_is_text() -> None:
    up = FakeOpenAI(reply=ToolCalls([], text="just text"))
    assert up._answer({}, "") == "just text"


def test_openai_tool_calls_completion(oai_up: FakeOpenAI, oai: openai.OpenAI) -> None:
    oai_up.reply = ToolCalls([WEATHER, ("get_time", '{"tz": "CET"}')])
    r = oai.chat.completions.create(
        model="m", messages=USER, tools=OAI_TOOLS, tool_choice="auto", parallel_tool_calls=True
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.refusal is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 2
    assert all(c.type == "function" and c.id.startswith("call_") for c in calls)
    assert calls[0].id != calls[1].id
    assert [(c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        ("get_weather", WEATHER_ARGS),
        ("get_time", '{"tz": "CET"}'),  # a string is sent as given
    ]
    assert r.usage is not None and r.usage.completion_tokens == (1 + 5) + (1 + 7)
    body = oai_up.last_request.body
    assert body["tools"] == OAI_TOOLS and body["tool_choice"] == "auto"
    assert body["parallel_tool_calls"] is True

    oai_up.reply = ToolCalls([WEATHER], text="Let me check.")
    r = oai.chat.completions.create(model="m", messages=USER, tools=OAI_TOOLS)
    assert r.choices[0].message.content == "Let me check."
    assert r.choices[0].message.tool_calls is not None
    assert r.choices[0].finish_reason == "tool_calls"


def test_openai_tool_calls_raw_stream(oai_up: FakeOpenAI, oai: openai.OpenAI) -> None:
    oai_up.reply = ToolCalls([WEATHER, ("get_time", "{}")])
    chunks = list(
        oai.chat.completions.create(
            model="m",
            messages=USER,
            tools=OAI_TOOLS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    first, *middle, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content is None and first.choices[0].delta.tool_calls is None
    deltas = [c.choices[0].delta.tool_calls for c in middle]
    assert all(d is not None and len(d) == 1 for d in deltas)
    calls = [d[0] for d in deltas if d is not None]
    # per call: an announcing chunk (id, type, name, empty arguments), then arguments pieces only
    announce = [c for c in calls if c.id is not None]
    assert [(c.index, c.type, c.function and c.function.name) for c in announce] == [
        (0, "function", "get_weather"),
        (1, "function", "get_time"),
    ]
    assert all(c.function is not None and c.function.arguments == "" for c in announce)
    pieces = [c for c in calls if c.id is None]
    assert all(c.type is None and c.function and c.function.name is None for c in pieces)
    assert [c.function.arguments for c in pieces if c.index == 0] == split_arguments(  # type: ignore[union-attr]
        WEATHER_ARGS
    )
    assert [c.function.arguments for c in pieces if c.index == 1] == ["{}"]  # type: ignore[union-attr]
    assert [c.index for c in calls] == [0] * 6 + [1] * 2  # calls in order, not interleaved
    assert finish.choices[0].finish_reason == "tool_calls"
    assert finish.choices[0].delta.tool_calls is None
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == 1 + 5 + 1 + 1


def test_openai_tool_calls_wire_format(oai_up: FakeOpenAI) -> None:
    oai_up.reply = ToolCalls([WEATHER])
    body = {"model": "m", "messages": USER, "stream": True}
    r = httpx2.post(
        oai_up.base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
    )
    lines = [line for line in r.text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"delta":{"role":"assistant","content":null,"refusal":null}' in lines[0]
    assert (
        '"delta":{"tool_calls":[{"index":0,"id":"call_fake00000001","type":"function",'
        '"function":{"name":"get_weather","arguments":""}}]}'
    ) in lines[1]
    assert '"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\""}}]}' in lines[2]
    assert '"finish_reason":"tool_calls"' in lines[-2]


def test_openai_tool_calls_stream_helper(oai_up: FakeOpenAI, oai: openai.OpenAI) -> None:
    oai_up.reply = ToolCalls([WEATHER, ("get_time", '{"tz": "CET"}')], text="Let me check.")
    with oai.chat.completions.stream(model="m", messages=USER, tools=OAI_TOOLS) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.index, e.name, e.arguments) for e in done] == [  # type: ignore[union-attr]
        (0, "get_weather", WEATHER_ARGS),
        (1, "get_time", '{"tz": "CET"}'),
    ]
    arg_deltas = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert "".join(e.arguments_delta for e in arg_deltas if e.index == 0) == WEATHER_ARGS  # type: ignore[union-attr]
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me check."
    assert message.tool_calls is not None
    assert [
        (c.id[:5], c.type, c.function.name, c.function.arguments) for c in message.tool_calls
    ] == [
        ("call_", "function", "get_weather", WEATHER_ARGS),
        ("call_", "function", "get_time", '{"tz": "CET"}'),
    ]
    # only strict tools are parsed
    assert message.tool_calls[0].function.parsed_arguments is None

    oai_up.reply = ToolCalls([WEATHER])
    with oai.chat.completions.stream(model="m", messages=USER, tools=OAI_STRICT_TOOLS) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.content is None
    assert message.tool_calls is not None
    assert message.tool_calls[0].function.parsed_arguments == {"city": "Paris"}


def test_openai_broken_tool_arguments(oai_up: FakeOpenAI, oai: openai.OpenAI) -> None:
    broken = '{"city": "Par'
    oai_up.reply = ToolCalls([("get_weather", broken)])
    r = oai.chat.completions.create(model="m", messages=USER, tools=OAI_TOOLS)
    assert r.choices[0].message.tool_calls[0].function.arguments == broken  # type: ignore[index,union-attr]
    with oai.chat.completions.stream(model="m", messages=USER, tools=OAI_TOOLS) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == broken  # type: ignore[index]
    # with a strict tool the stream helper json.loads the arguments when the call is done
    with (
        pytest.raises(json.JSONDecodeError),
        oai.chat.completions.stream(model="m", messages=USER, tools=OAI_STRICT_TOOLS) as stream,
    ):
        stream.get_final_completion()


async def test_openai_tool_loop_async(aoai_up: FakeOpenAI, aoai: openai.AsyncOpenAI) -> None:
    """Two steps: the model calls the tool; the client returns the result; the model answers."""

    def reply(body: dict[str, Any]) -> str | ToolCalls:
        results = [m["content"] for m in body["messages"] if m["role"] == "tool"]
        if not results:
            return ToolCalls([WEATHER])
        return f"The weather: {results[-1]}"

    aoai_up.reply = reply
    messages: list[Any] = [{"role": "user", "content": "what is the weather"}]
    r = await aoai.chat.completions.create(model="m", messages=messages, tools=OAI_TOOLS)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.tool_calls is not None
    call = message.tool_calls[0]
    assert call.function.arguments == WEATHER_ARGS  # type: ignore[union-attr]

    messages += [
        message.model_dump(exclude_none=True, exclude={"annotations"}),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny and warm"},
    ]
    async with aoai.chat.completions.stream(
        model="m", messages=messages, tools=OAI_TOOLS, stream_options={"include_usage": True}
    ) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "The weather: sunny and warm"
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.tool_calls is None

    sent = aoai_up.last_request.body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.id and sent[1].get("content") is None
    assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": "sunny and warm"}
    # prompt: 4 words + (get_weather, its arguments) + 3 words
    assert final.usage is not None and final.usage.prompt_tokens == 4 + 2 + 3

    # the default echo answers the last *user* message, not the tool result
    aoai_up.reply = None
    messages[-1] = {
        "role": "tool",
        "tool_call_id": call.id,
        "content": [{"type": "text", "text": "sunny"}],
    }
    r = await aoai.chat.completions.create(model="m", messages=messages)
    assert r.choices[0].message.content == "echo: what is the weather"
    assert r.usage is not None and r.usage.prompt_tokens == 4 + 2 + 1


async def test_openai_tool_calls_async_raw_stream(
    aoai_up: FakeOpenAI, aoai: openai.AsyncOpenAI
) -> None:
    aoai_up.reply = lambda body: ToolCalls([WEATHER], text="ok")
    stream = await aoai.chat.completions.create(
        model="m", messages=USER, tools=OAI_TOOLS, stream=True
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.content == ""  # there is text: like a text reply
    assert chunks[1].choices[0].delta.content == "ok"
    args = "".join(
        tc.function.arguments or ""
        for c in chunks
        for tc in c.choices[0].delta.tool_calls or []
        if tc.function is not None
    )
    assert args == WEATHER_ARGS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_openai_tool_stream_faults(aoai_up: FakeOpenAI, aoai: openai.AsyncOpenAI) -> None:
    aoai_up.reply = ToolCalls([WEATHER])
    aoai_up.inject(Fault(break_after=3, token_delay=0.001))
    stream = await aoai.chat.completions.create(model="m", messages=USER, stream=True)
    received = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk.choices[0].delta)
    # role chunk, then 3 deltas: the call's announcement and two arguments pieces
    assert received[1].tool_calls is not None and received[1].tool_calls[0].id is not None
    assert [d.tool_calls[0].function.arguments for d in received[2:]] == ['{"', "city"]  # type: ignore[index,union-attr]
    assert aoai_up.last_request.outcome == "broken"

    aoai_up.token_delay(0.001)
    stream = await aoai.chat.completions.create(model="m", messages=USER, stream=True)
    chunks = [c async for c in stream]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert aoai_up.last_request.outcome == "ok"


def test_anthropic_tool_use_message(ant_up: FakeAnthropic, ant: anthropic.Anthropic) -> None:
    ant_up.reply = ToolCalls([WEATHER, ("get_time", '{"tz": "CET"}')], text="Let me check.")
    m = ant.messages.create(
        model="c",
        max_tokens=100,
        messages=USER,
        tools=ANT_TOOLS,
        tool_choice={"type": "auto"},
    )
    assert m.stop_reason == "tool_use"
    text, use1, use2 = m.content
    assert text.type == "text" and text.text == "Let me check."
    assert use1.type == "tool_use" and use2.type == "tool_use"
    assert use1.id.startswith("toolu_") and use1.id != use2.id
    assert (use1.name, use1.input) == ("get_weather", {"city": "Paris"})
    assert (use2.name, use2.input) == ("get_time", {"tz": "CET"})  # a string is parsed
    assert m.usage.output_tokens == 3 + (1 + 5) + (1 + 7)
    body = ant_up.last_request.body
    assert body["tools"] == ANT_TOOLS and body["tool_choice"] == {"type": "auto"}

    ant_up.reply = ToolCalls([WEATHER])  # no text: no text block
    m = ant.messages.create(model="c", max_tokens=1, messages=USER, tools=ANT_TOOLS)
    assert [b.type for b in m.content] == ["tool_use"]
    assert m.stop_reason == "tool_use"  # max_tokens does not apply to tool calls


def test_anthropic_tool_use_raw_stream(ant_up: FakeAnthropic, ant: anthropic.Anthropic) -> None:
    ant_up.reply = ToolCalls([WEATHER, ("get_time", "{}")], text="Let me check.")
    events = list(
        ant.messages.create(model="c", max_tokens=100, messages=USER, tools=ANT_TOOLS, stream=True)
    )
    types = [(e.type, getattr(e, "index", None)) for e in events]
    pieces = split_arguments(WEATHER_ARGS)
    assert types == [
        ("message_start", None),
        ("content_block_start", 0),
        *[("content_block_delta", 0)] * 3,
        ("content_block_stop", 0),
        ("content_block_start", 1),
        *[("content_block_delta", 1)] * len(pieces),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert starts[0].type == "text"
    assert starts[1].type == "tool_use" and starts[2].type == "tool_use"
    assert (starts[1].name, starts[1].input) == ("get_weather", {})
    assert starts[1].id.startswith("toolu_")
    json_deltas = [
        (e.index, e.delta.partial_json)
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert json_deltas == [(1, p) for p in pieces] + [(2, "{}")]
    end = events[-2]
    assert end.type == "message_delta" and end.delta.stop_reason == "tool_use"
    assert end.usage.output_tokens == 3 + 1 + len(pieces) + 1 + 1


def test_anthropic_tool_use_wire_format(ant_up: FakeAnthropic) -> None:
    ant_up.reply = ToolCalls([WEATHER])
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    body = {"model": "c", "max_tokens": 10, "messages": USER, "stream": True}
    r = httpx2.post(ant_up.url + "/v1/messages", json=body, headers=headers)
    names = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    n = len(split_arguments(WEATHER_ARGS))
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * n,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert (
        '{"type":"content_block_start","index":0,"content_block":{"type":"tool_use",'
        '"id":"toolu_fake00000001","name":"get_weather","input":{}}}'
    ) in r.text
    assert (
        '{"type":"content_block_delta","index":0,'
        '"delta":{"type":"input_json_delta","partial_json":"city"}}'
    ) in r.text
    assert '"stop_reason":"tool_use"' in r.text


def test_anthropic_tool_use_stream_helper(ant_up: FakeAnthropic, ant: anthropic.Anthropic) -> None:
    ant_up.reply = ToolCalls([WEATHER, ("get_time", '{"tz": "CET"}')], text="Let me check.")
    with ant.messages.stream(model="c", max_tokens=100, messages=USER, tools=ANT_TOOLS) as stream:
        events = list(stream)
        final = stream.get_final_message()
    snapshots = [e.snapshot for e in events if e.type == "input_json"]
    assert snapshots[-1] == {"tz": "CET"}
    assert {"city": "Paris"} in snapshots
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    assert final.content[0].text == "Let me check."  # type: ignore[union-attr]
    uses = [b for b in final.content if b.type == "tool_use"]
    assert [(b.name, b.input) for b in uses] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "CET"}),
    ]


def test_anthropic_broken_tool_arguments(ant_up: FakeAnthropic, ant: anthropic.Anthropic) -> None:
    truncated = '{"city": "Par'
    ant_up.reply = ToolCalls([("get_weather", truncated)])
    # not streamed: the raw text is sent as `input` (the real API always sends an object);
    # the SDK does not validate, so the block's input is a str
    m = ant.messages.create(model="c", max_tokens=10, messages=USER, tools=ANT_TOOLS)
    assert m.content[0].input == truncated  # type: ignore[union-attr]
    # streamed, the pieces are sent as is: the raw events carry them unchanged ...
    events = list(ant.messages.create(model="c", max_tokens=10, messages=USER, stream=True))
    assert (
        "".join(
            e.delta.partial_json
            for e in events
            if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        )
        == truncated
    )
    # ... but the stream helper parses the growing JSON in partial mode, which drops an
    # unfinished string: truncated arguments silently become {} ...
    with ant.messages.stream(model="c", max_tokens=10, messages=USER) as stream:
        final = stream.get_final_message()
    assert final.content[0].input == {}  # type: ignore[union-attr]
    # ... and JSON that is not even a prefix of valid JSON raises ValueError mid-stream
    ant_up.reply = ToolCalls([("get_weather", "{not json")])
    with (
        pytest.raises(ValueError, match="Unable to parse tool parameter JSON"),
        ant.messages.stream(model="c", max_tokens=10, messages=USER) as stream,
    ):
        stream.get_final_message()


async def test_anthropic_tool_loop_async(
    aant_up: FakeAnthropic, aant: anthropic.AsyncAnthropic
) -> None:
    """Two steps: the model calls the tool; the client returns the result; the model answers."""

    def reply(body: dict[str, Any]) -> str | ToolCalls:
        last = body["messages"][-1]["content"]
        results = [b for b in last if b["type"] == "tool_result"] if isinstance(last, list) else []
        if not results:
            return ToolCalls([WEATHER], text="Let me check.")
        return f"The weather: {results[0]['content']}"

    aant_up.reply = reply
    messages: list[Any] = [{"role": "user", "content": "what is the weather"}]
    async with aant.messages.stream(
        model="c", max_tokens=100, messages=messages, tools=ANT_TOOLS
    ) as stream:
        first = await stream.get_final_message()
    assert first.stop_reason == "tool_use"
    use = first.content[1]
    assert use.type == "tool_use" and use.input == {"city": "Paris"}

    messages += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "sunny and warm"}
            ],
        },
    ]
    m = await aant.messages.create(model="c", max_tokens=100, messages=messages, tools=ANT_TOOLS)
    assert m.stop_reason == "end_turn"
    assert m.content[0].text == "The weather: sunny and warm"  # type: ignore[union-attr]
    sent = aant_up.last_request.body["messages"]
    assert sent[1]["content"][1] == {
        "type": "tool_use",
        "id": use.id,
        "name": "get_weather",
        "input": {"city": "Paris"},
    }
    # prompt: 4 words + "Let me check." + (get_weather, its input) + 3 words
    assert m.usage.input_tokens == 4 + 3 + 2 + 3

    # the default echo answers the last user *text*, not a turn of tool results only
    aant_up.reply = None
    messages[-1]["content"][0]["content"] = [{"type": "text", "text": "sunny"}]
    m = await aant.messages.create(model="c", max_tokens=100, messages=messages)
    assert m.content[0].text == "echo: what is the weather"  # type: ignore[union-attr]
    assert m.usage.input_tokens == 4 + 3 + 2 + 1
    counted = await aant.messages.count_tokens(model="c", messages=messages)
    assert counted.input_tokens == 4 + 3 + 2 + 1
    # a user turn with text after its tool results is the last user message
    messages[-1]["content"].append({"type": "text", "text": "and tomorrow?"})
    m = await aant.messages.create(model="c", max_tokens=100, messages=messages)
    assert m.content[0].text == "echo: and tomorrow?"  # type: ignore[union-attr]


async def test_anthropic_tool_stream_faults(
    aant_up: FakeAnthropic, aant: anthropic.AsyncAnthropic
) -> None:
    aant_up.reply = ToolCalls([WEATHER], text="a b")
    aant_up.break_stream_after(3)
    seen = []
    with pytest.raises(BROKEN_STREAM_ERRORS):
        stream = await aant.messages.create(model="c", max_tokens=10, messages=USER, stream=True)
        async for event in stream:
            seen.append((event.type, getattr(event, "index", None)))
    # the 3 deltas: two text pieces, the first arguments piece (after its block's start)
    assert seen == [
        ("message_start", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
    ]
    assert aant_up.last_request.outcome == "broken"

    aant_up.token_delay(0.001)
    async with aant.messages.stream(model="c", max_tokens=10, messages=USER) as s:
        final = await s.get_final_message()
    assert final.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert aant_up.last_request.outcome == "ok"
