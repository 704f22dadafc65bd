"""The fake upstreams, checked with the official openai / anthropic SDKs as clients."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import anthropic
import httpx2
import openai
import pytest

from tests.fakes.upstreams import FakeAnthropic, FakeOpenAI, Fault, split_tokens

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
    async with openai.AsyncOpenAI(
        base_url=aoai_up.base_url, api_key="wrong", max_retries=0
    ) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.chat.completions.create(model="m", messages=USER)
    assert info.value.code == "invalid_api_key"
    async with openai.AsyncOpenAI(base_url=aoai_up.base_url, api_key=KEY, max_retries=0) as ok:
        models = [m.id async for m in ok.models.list()]
    assert models == list(aoai_up.models)
    assert aoai_up.last_request.path == "/v1/models" and aoai_up.last_request.body is None


async def test_openai_rejects_bad_body(aoai_up: FakeOpenAI) -> None:
    async with aiohttp.ClientSession() as http, http.post(
        aoai_up.base_url + "/chat/completions",
        data=b"not json",
        headers={"Authorization": f"Bearer {KEY}"},
    ) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert aoai_up.last_request.body is None


def test_openai_separate_process(repo_root: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.upstreams", "openai", "--port", "0"],
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

    async with aiohttp.ClientSession() as http, http.post(
        aant_up.url + "/v1/messages",
        json={"model": "c", "max_tokens": 5, "messages": USER},
        headers={"x-api-key": KEY},
    ) as resp:
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
    async with FakeOpenAI() as up1, FakeOpenAI(reply="two") as up2:
        async with openai.AsyncOpenAI(base_url=up1.base_url, api_key="x", max_retries=0) as c1:
            async with openai.AsyncOpenAI(base_url=up2.base_url, api_key="x", max_retries=0) as c2:
                results = await asyncio.gather(
                    *(c.chat.completions.create(model="m", messages=USER) for c in [c1, c2] * 5)
                )
    assert [r.choices[0].message.content for r in results] == [ECHO, "two"] * 5
    assert len(up1.requests) == len(up2.requests) == 5
