"""OpenAI's chat completions wire over aiohttp: one request, JSON or Server-Sent Events.

Veil's hottest path is this call. The openai SDK spent about 0.9 ms of CPU on it
(request models, httpx, anyio, response models): half of all the CPU Veil used
for a turn (`python bench/gateway_overhead.py`). Veil needs none of that
machinery: its messages are already in the wire shape, retries are its own, and
msgspec decodes the reply straight into the few fields it reads. Configuration
follows the SDK's: OPENAI_BASE_URL, OPENAI_API_KEY, OPENAI_ORG_ID and
OPENAI_PROJECT_ID, sent the way the SDK sends them, and the proxy the environment
names (HTTPS_PROXY, HTTP_PROXY, NO_PROXY).
"""

from __future__ import annotations

import contextlib
import os
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import msgspec

from actors.engines.base import EngineError

__all__ = [
    "DEFAULT_BASE_URL",
    "ChatCompletion",
    "Chunk",
    "OpenAIHTTP",
    "parse_retry_after",
]

DEFAULT_BASE_URL = "https://api.openai.com/v1"

T = TypeVar("T")

# Error text kept from an upstream's body: enough to say why, never a whole page.
_MAX_REASON = 500


class FunctionPart(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class ToolCallPart(msgspec.Struct):
    index: int = 0
    id: str | None = None
    type: str | None = None
    function: FunctionPart | None = None


class Message(msgspec.Struct):
    content: str | None = None
    tool_calls: list[ToolCallPart] | None = None


class Choice(msgspec.Struct):
    index: int = 0
    message: Message = msgspec.field(default_factory=Message)
    finish_reason: str | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletion(msgspec.Struct):
    # Some servers send null where OpenAI sends an empty list.
    choices: list[Choice] | None = None
    usage: Usage | None = None
    # A server that reports a failure with HTTP 200.
    error: Any = None


class ChunkChoice(msgspec.Struct):
    index: int = 0
    delta: Message | None = None
    finish_reason: str | None = None


class Chunk(msgspec.Struct):
    choices: list[ChunkChoice] | None = None
    usage: Usage | None = None
    # An upstream that fails mid-stream says so in a data line (OpenAI and vLLM do).
    error: Any = None


_completion = msgspec.json.Decoder(ChatCompletion)
_chunk = msgspec.json.Decoder(Chunk)
_encode = msgspec.json.Encoder().encode


def proxy_for(url: str) -> str | None:
    """The proxy the environment names for `url`, unless NO_PROXY exempts its host."""
    parts = urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def parse_retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _reason(body: bytes) -> str:
    """The upstream's own words: `error.message` when it speaks OpenAI's error shape."""
    try:
        error = msgspec.json.decode(body).get("error")
    except (msgspec.DecodeError, AttributeError):
        error = None
    message = error.get("message") if isinstance(error, dict) else None
    if isinstance(message, str):
        return message[:_MAX_REASON]
    if isinstance(error, str):
        return error[:_MAX_REASON]
    return body.decode("utf-8", "replace").strip()[:_MAX_REASON] or "no reason given"


def _status_error(status: int, body: bytes, retry_after: str | None) -> EngineError:
    return EngineError(
        502,
        "upstream_error",
        f"The upstream model failed with HTTP {status}.",
        retryable=status == 429 or status >= 500,
        retry_after=parse_retry_after(retry_after),
        detail=_reason(body),
    )


def _decoded(decoder: msgspec.json.Decoder[T], data: bytes, failure: str) -> T:
    """`data` decoded, or a 502 saying the upstream model `failure`."""
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as error:
        raise EngineError(
            502, "upstream_error", f"The upstream model {failure}.", detail=str(error)
        ) from error


def _timeout_error() -> EngineError:
    return EngineError(
        504, "upstream_timeout", "The upstream model did not answer in time.", retryable=True
    )


def _unreachable(url: str, error: Exception) -> EngineError:
    # aiohttp's messages can be bare (an invalid URL says only the URL): name the kind too.
    reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return EngineError(
        502,
        "upstream_unreachable",
        "The upstream model could not be reached.",
        retryable=True,
        detail=f"{url}: {reason}",
    )


def _broken(error: Exception) -> EngineError:
    # The connection dropped mid-answer; the chain decides whether a retry is still possible.
    return EngineError(
        502,
        "upstream_error",
        "The upstream model's answer broke off.",
        retryable=True,
        detail=f"{type(error).__name__}: {error}",
    )


def _reported_error(error: Any, what: str) -> EngineError:
    """An error the upstream put in its body (a 200 answer, or a stream's data line)."""
    message = error.get("message") if isinstance(error, dict) else error
    return EngineError(502, "upstream_error", f"{what}.", detail=str(message)[:_MAX_REASON])


class OpenAIHTTP:
    """A keep-alive connection pool to one OpenAI-compatible base URL."""

    def __init__(self, *, base_url: str | None, api_key: str | None, timeout: float) -> None:
        # An empty OPENAI_BASE_URL (compose passes one through) means the default.
        base = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        self.url = base.rstrip("/") + "/chat/completions"
        self._headers = {
            "Authorization": f"Bearer {api_key or os.environ.get('OPENAI_API_KEY') or 'not-needed'}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        if organization := os.environ.get("OPENAI_ORG_ID"):
            self._headers["OpenAI-Organization"] = organization
        if project := os.environ.get("OPENAI_PROJECT_ID"):
            self._headers["OpenAI-Project"] = project
        # Like the SDK's timeout: for connecting and between bytes, not for a whole
        # stream, which may rightly run for minutes.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)
        # Looked up once: aiohttp's trust_env would read the environment on every request.
        self._proxy = proxy_for(self.url)
        self._session: aiohttp.ClientSession | None = None

    def _pool(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the loop that runs the engine.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=30),
                timeout=self._timeout,
                skip_auto_headers=("User-Agent",),
                headers={"User-Agent": "Veil"},
            )
        return self._session

    def _post(self, body: dict[str, Any]) -> Any:
        return self._pool().post(
            self.url, data=_encode(body), headers=self._headers, proxy=self._proxy
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @contextlib.asynccontextmanager
    async def _exchange(self, body: dict[str, Any]) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST `body` and hand over a successful response; every failure, of the request or
        of reading the answer in the caller's block, leaves as an EngineError."""
        answering = False
        try:
            async with self._post(body) as response:
                answering = True
                if response.status >= 400:
                    payload = await response.read()
                    raise _status_error(
                        response.status, payload, response.headers.get("Retry-After")
                    )
                yield response
        except TimeoutError as error:
            raise _timeout_error() from error
        except aiohttp.ClientError as error:
            raise (_broken(error) if answering else _unreachable(self.url, error)) from error

    async def complete(self, body: dict[str, Any]) -> ChatCompletion:
        """One non-streaming chat completion."""
        async with self._exchange(body) as response:
            payload = await response.read()
        completion = _decoded(
            _completion, payload, "answered with something else than a completion"
        )
        if completion.error is not None and not completion.choices:
            raise _reported_error(completion.error, "The upstream model failed")
        return completion

    async def stream(self, body: dict[str, Any]) -> AsyncGenerator[Chunk, None]:
        """The chunks of a streamed chat completion, until `data: [DONE]` or the end."""
        async with self._exchange(body) as response:
            async for data in _sse_data(response.content):
                if data == b"[DONE]":
                    return
                chunk = _decoded(_chunk, data, "sent a broken stream chunk")
                if chunk.error is not None:
                    raise _reported_error(chunk.error, "The upstream model failed mid-stream")
                yield chunk


async def _sse_data(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The data of each Server-Sent Event (multi-line data joined by newlines).

    Comments (`:`) and the other fields are skipped: OpenAI-compatible servers
    put everything in `data`. Lines are split here rather than by the reader's
    readline, which refuses lines over 64 KiB (a tool call's arguments can be).
    """
    buffer = bytearray()
    lines: list[bytes] = []
    async for block in content.iter_any():
        buffer += block
        start = 0
        while (end := buffer.find(b"\n", start)) != -1:
            line = bytes(buffer[start:end]).rstrip(b"\r")
            start = end + 1
            if not line:
                if lines:
                    yield b"\n".join(lines)
                    lines = []
            elif line.startswith(b"data:"):
                value = line[5:]
                lines.append(value[1:] if value.startswith(b" ") else value)
        del buffer[:start]
    if buffer.startswith(b"data:"):
        lines.append(bytes(buffer[5:]).lstrip(b" "))
    if lines:
        yield b"\n".join(lines)
