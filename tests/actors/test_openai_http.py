"""The OpenAI wire client against a loopback server that writes exact bytes.

The fake upstreams cover the usual answers end to end; these pin the edges of the
wire: how SSE arrives in pieces, what an upstream's errors look like, what the
client sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from actors.engines.base import EngineError
from actors.engines.openai_http import OpenAIHTTP

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/v1"

    yield start
    for runner in runners:
        await runner.cleanup()


def raw_stream(*pieces: bytes, pause: float = 0.0) -> Handler:
    """A handler that writes the SSE body in exactly these pieces."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(pause)
        return response

    return handler


async def chunks_of(client: OpenAIHTTP) -> list[str]:
    texts = []
    try:
        async for chunk in client.stream({"model": "m", "messages": [], "stream": True}):
            for choice in chunk.choices or ():
                if choice.delta is not None and choice.delta.content:
                    texts.append(choice.delta.content)
    finally:
        await client.aclose()
    return texts


async def test_sse_split_anywhere_crlf_comments_and_multiline_data(serve) -> None:
    body = (
        b": keep-alive comment\r\n\r\n"
        b'data: {"choices":[{"index":0,"delta":{"content":"He"}}]}\r\n\r\n'
        b"event: message\n"
        b'data: {"choices":[{"index":0,\n'
        b'data: "delta":{"content":"llo"}}]}\n\n'
        b"data: [DONE]\n\n"
        b'data: {"choices":[{"index":0,"delta":{"content":"after done"}}]}\n\n'
    )
    # One byte at a time: every line and event boundary falls inside a read.
    url = await serve(raw_stream(*(body[i : i + 1] for i in range(len(body)))))
    assert await chunks_of(OpenAIHTTP(base_url=url, api_key="k", timeout=5)) == ["He", "llo"]


async def test_a_line_longer_than_aiohttp_readline_allows(serve) -> None:
    big = "x" * 300_000
    line = b'data: {"choices":[{"index":0,"delta":{"content":"' + big.encode() + b'"}}]}\n\n'
    url = await serve(raw_stream(line, b"data: [DONE]\n\n"))
    assert await chunks_of(OpenAIHTTP(base_url=url, api_key="k", timeout=5)) == [big]


async def test_a_stream_without_done_or_final_blank_line_ends_with_its_last_event(serve) -> None:
    url = await serve(raw_stream(b'data: {"choices":[{"index":0,"delta":{"content":"end"}}]}'))
    assert await chunks_of(OpenAIHTTP(base_url=url, api_key="k", timeout=5)) == ["end"]


async def test_an_error_inside_the_stream_is_an_upstream_error(serve) -> None:
    url = await serve(
        raw_stream(
            b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
            b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n',
        )
    )
    with pytest.raises(EngineError) as caught:
        await chunks_of(OpenAIHTTP(base_url=url, api_key="k", timeout=5))
    assert caught.value.info.status == 502
    assert caught.value.info.detail == "overloaded"


async def test_garbage_in_the_stream_is_a_502_not_a_crash(serve) -> None:
    url = await serve(raw_stream(b"data: {not json\n\n"))
    with pytest.raises(EngineError) as caught:
        await chunks_of(OpenAIHTTP(base_url=url, api_key="k", timeout=5))
    assert caught.value.info.code == "upstream_error"


async def test_status_errors_keep_the_upstreams_reason_and_retry_after(serve) -> None:
    async def limited(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "error": {
                    "message": "Rate limit reached",
                    "type": "requests",
                    "code": "rate_limit_exceeded",
                }
            },
            status=429,
            headers={"Retry-After": "1.5"},
        )

    client = OpenAIHTTP(base_url=await serve(limited), api_key="k", timeout=5)
    with pytest.raises(EngineError) as caught:
        await client.complete({"model": "m", "messages": []})
    await client.aclose()
    info = caught.value.info
    assert (info.status, info.retryable, info.retry_after) == (502, True, 1.5)
    # The upstream's own words are for operators (log, events), not for clients.
    assert info.message == "The upstream model failed with HTTP 429."
    assert info.detail == "Rate limit reached"


async def test_a_plain_text_error_body_is_quoted_and_4xx_is_not_retried(serve) -> None:
    async def bad(request: web.Request) -> web.Response:
        return web.Response(status=400, text="<html>bad gateway config</html>")

    client = OpenAIHTTP(base_url=await serve(bad), api_key="k", timeout=5)
    with pytest.raises(EngineError) as caught:
        await client.complete({"model": "m", "messages": []})
    await client.aclose()
    assert caught.value.info.retryable is False
    assert caught.value.info.message.endswith("HTTP 400.")
    assert caught.value.info.detail == "<html>bad gateway config</html>"


async def test_a_non_completion_body_is_a_502(serve) -> None:
    async def odd(request: web.Request) -> web.Response:
        return web.Response(text="OK")

    client = OpenAIHTTP(base_url=await serve(odd), api_key="k", timeout=5)
    with pytest.raises(EngineError) as caught:
        await client.complete({"model": "m", "messages": []})
    await client.aclose()
    assert caught.value.info.status == 502


async def test_unreachable_and_slow_upstreams(serve, unused_tcp_port: int) -> None:
    client = OpenAIHTTP(base_url=f"http://127.0.0.1:{unused_tcp_port}/v1", api_key="k", timeout=5)
    with pytest.raises(EngineError) as caught:
        await client.complete({"model": "m", "messages": []})
    await client.aclose()
    assert (caught.value.info.code, caught.value.info.retryable) == ("upstream_unreachable", True)

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.json_response({"choices": []})

    client = OpenAIHTTP(base_url=await serve(slow), api_key="k", timeout=0.3)
    with pytest.raises(EngineError) as caught:
        await client.complete({"model": "m", "messages": []})
    await client.aclose()
    assert (caught.value.info.status, caught.value.info.code) == (504, "upstream_timeout")


async def test_headers_follow_the_sdks_environment_variables(serve, monkeypatch) -> None:
    seen: dict[str, str] = {}

    async def record(request: web.Request) -> web.Response:
        seen.update(request.headers)
        return web.json_response({"choices": [{"index": 0, "message": {"content": "hi"}}]})

    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-1")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-1")
    client = OpenAIHTTP(base_url=await serve(record) + "/", api_key=None, timeout=5)
    answer = await client.complete({"model": "m", "messages": []})
    await client.aclose()
    assert answer.choices[0].message.content == "hi"
    assert seen["Authorization"] == "Bearer sk-from-env"
    assert (seen["OpenAI-Organization"], seen["OpenAI-Project"]) == ("org-1", "proj-1")
    assert seen["Content-Type"] == "application/json"


async def test_the_environments_proxy_is_used_unless_no_proxy_exempts_the_host(
    serve, monkeypatch
) -> None:
    seen: list[str] = []

    async def proxy(request: web.Request) -> web.Response:
        # A forward proxy receives the absolute URL of the upstream.
        seen.append(str(request.url))
        return web.json_response({"choices": [{"index": 0, "message": {"content": "via proxy"}}]})

    proxy_url = (await serve(proxy)).removesuffix("/v1")
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = OpenAIHTTP(base_url="http://upstream.example/v1", api_key="k", timeout=5)
    answer = await client.complete({"model": "m", "messages": []})
    await client.aclose()
    assert answer.choices[0].message.content == "via proxy"
    assert seen == ["http://upstream.example/v1/chat/completions"]
    monkeypatch.setenv("NO_PROXY", "upstream.example")
    assert OpenAIHTTP(base_url="http://upstream.example/v1", api_key="k", timeout=5)._proxy is None


async def test_a_failure_reported_with_http_200_is_an_error_and_null_choices_are_tolerated(
    serve,
) -> None:
    async def failing(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "model overloaded"}})

    client = OpenAIHTTP(base_url=await serve(failing), api_key="k", timeout=5)
    with pytest.raises(EngineError) as caught:
        await client.complete({"model": "m", "messages": []})
    await client.aclose()
    assert caught.value.info.message == "The upstream model failed."
    assert caught.value.info.detail == "model overloaded"

    url = await serve(
        raw_stream(
            b'data: {"choices":[{"index":0,"delta":{"content":"ok"}}],"usage":null}\n\n',
            b'data: {"choices":null,"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n',
            b"data: [DONE]\n\n",
        )
    )
    assert await chunks_of(OpenAIHTTP(base_url=url, api_key="k", timeout=5)) == ["ok"]
