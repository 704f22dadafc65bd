"""Steady chat traffic through the official `openai` SDK, for fault runs.

Each conversation is a client that sends one request at a time: a new session (Veil names
it) or a name of its own, then continues it with X-Session-Id; streamed or not; every
request under an Idempotency-Key of its own, retried with the same key (on the next
gateway, round robin) until it completes. The SDK's own retries are off: every attempt is
recorded, with how it failed, for the checks of testkit/logcheck.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx2 as httpx
import openai

__all__ = ["Attempt", "Request", "Traffic", "error_kind"]

# Failures no OpenAI client can read as an answer: nothing came back in time, or the
# connection broke mid-answer, or a stream ended without its end. Not among them:
# `refused` (no gateway listening) and `closed` (a connection closed before the answer
# began: for a stream, before its headers; a keep-alive connection a draining gateway
# shut as the request went out), which carry nothing to shape and which the SDKs retry
# by default.
UNSHAPED = frozenset({"timeout", "dropped", "truncated", "wrong_answer", "unexpected"})


@dataclass
class Attempt:
    gateway: int
    started: float
    ended: float = 0.0
    outcome: str = "pending"  # "ok", or error_kind()


@dataclass
class Request:
    """One logical request: what the client asked, under one Idempotency-Key."""

    conversation: int
    key: str
    text: str
    stream: bool
    session_id: str | None  # the session named on the request (None: a new one)
    attempts: list[Attempt] = field(default_factory=list)
    chunks: int = 0  # content chunks read by the attempt now streaming
    content: str | None = None  # the answer the client acknowledged
    completion_id: str | None = None
    answered_session: str | None = None
    completed_at: float | None = None

    @property
    def turn_id(self) -> str | None:
        return None if self.completion_id is None else self.completion_id.removeprefix("chatcmpl-")


def error_kind(error: BaseException) -> str:
    """How an attempt failed, in a word or two: `503 service_unavailable`, `stream 503
    worker_lost` (an SSE error event), `refused` (no gateway listening), `timeout`..."""
    if isinstance(error, _Failed):
        return error.kind
    if isinstance(error, openai.APIStatusError):
        try:
            body = error.response.json()
        except ValueError:
            return f"{error.status_code} not_json"
        inner = body.get("error") if isinstance(body, dict) else None
        if not isinstance(inner, dict) or "message" not in inner:
            return f"{error.status_code} not_openai_shaped"
        return f"{error.status_code} {inner.get('code') or inner.get('type')}"
    if isinstance(error, openai.APITimeoutError):
        return "timeout"
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__
        if isinstance(cause, httpx.ConnectError):
            return "refused"
        return "dropped"
    if isinstance(error, openai.APIError):  # an SSE error event
        body = error.body
        if isinstance(body, dict) and "message" in body:
            return f"stream {body.get('code') or body.get('type')}"
        return "stream not_openai_shaped"
    if isinstance(error, httpx.TimeoutException):
        return "timeout"
    if isinstance(error, httpx.HTTPError):
        return "dropped"
    return f"unexpected {type(error).__name__}"


class Traffic:
    """`conversations` clients round robin over `gateways()` (read per attempt: a
    restarted gateway may move)."""

    def __init__(
        self,
        gateways: Callable[[], list[str]],
        api_key: str,
        answer: Callable[[str], str],
        *,
        conversations: int = 4,
        attempt_timeout: float = 20.0,
        give_up: float = 90.0,
        new_session_every: int = 4,
        seed: int = 16,
    ) -> None:
        self._gateways = gateways
        self._key = api_key
        self._answer = answer
        self._conversations = conversations
        self._attempt_timeout = attempt_timeout
        self._give_up = give_up
        self._new_every = new_session_every
        self._random = random.Random(seed)
        self._next_gateway = itertools.count()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._done = asyncio.Condition()
        self.requests: list[Request] = []
        self.run_id = uuid.uuid4().hex[:6]

    # -- what happened ------------------------------------------------------------------

    @property
    def completed(self) -> list[Request]:
        return [r for r in self.requests if r.completed_at is not None]

    def errors(self) -> Counter[str]:
        return Counter(
            a.outcome for r in self.requests for a in r.attempts if a.outcome not in ("ok",)
        )

    def streaming_now(self) -> dict[str, Request]:
        """Streamed requests whose current attempt has read content: by their text."""
        return {
            r.text: r
            for r in self.requests
            if r.stream and r.completed_at is None and r.chunks > 0 and r.attempts
        }

    async def wait_for_success_after(self, since: float, timeout: float = 120) -> float:
        """When the first request whose successful attempt started at or after `since`
        completed (the system works again after a fault)."""
        async with self._done:
            await asyncio.wait_for(
                self._done.wait_for(lambda: self._first_after(since) is not None), timeout
            )
        found = self._first_after(since)
        assert found is not None
        return found

    async def wait_for_completions(self, count: int, since: float, timeout: float = 120) -> None:
        """Until `count` requests completed with attempts started after `since`."""

        def enough() -> bool:
            return sum(1 for r in self.completed if r.attempts[-1].started >= since) >= count

        async with self._done:
            await asyncio.wait_for(self._done.wait_for(enough), timeout)

    def _first_after(self, since: float) -> float | None:
        times = [
            r.completed_at
            for r in self.completed
            if r.completed_at is not None and r.attempts[-1].started >= since
        ]
        return min(times) if times else None

    # -- running ------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._conversation(c)) for c in range(self._conversations)
        ]

    async def stop(self) -> None:
        """Let each conversation finish (with its retries) the request it is on, then end."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    async def _conversation(self, c: int) -> None:
        session: str | None = None
        async with httpx.AsyncClient(timeout=self._attempt_timeout) as http:
            clients = {
                url: openai.AsyncOpenAI(
                    base_url=url, api_key=self._key, max_retries=0, http_client=http
                )
                for url in self._gateways()
            }
            for n in itertools.count():
                if self._stopping.is_set():
                    return
                if session is None or n % self._new_every == 0:
                    # A new session: Veil names it, or the client does (a chat front end's id).
                    session = None if self._random.random() < 0.5 else self._name(c, n)
                request = Request(
                    conversation=c,
                    key=f"{self.run_id}-{c}-{n}-{uuid.uuid4().hex[:8]}",
                    text=f"c{c} t{n} {self.run_id}",
                    stream=self._random.random() < 0.6,
                    session_id=session,
                )
                self.requests.append(request)
                await self._until_done(request, clients, http)
                if request.completed_at is None:
                    session = None  # given up: the next request opens another session
                else:
                    session = request.answered_session

    def _name(self, c: int, n: int) -> str:
        return f"fx-{self.run_id}-{c}-{n}"

    async def _until_done(
        self, request: Request, clients: dict[str, openai.AsyncOpenAI], http: httpx.AsyncClient
    ) -> None:
        """Attempts under the request's key until one completes, or `give_up` passes."""
        first = time.monotonic()
        pause = 0.1
        while time.monotonic() - first < self._give_up:
            urls = self._gateways()
            g = next(self._next_gateway) % len(urls)
            client = clients.get(urls[g])
            if client is None:
                client = clients[urls[g]] = openai.AsyncOpenAI(
                    base_url=urls[g], api_key=self._key, max_retries=0, http_client=http
                )
            attempt = Attempt(gateway=g, started=time.monotonic())
            request.attempts.append(attempt)
            request.chunks = 0
            try:
                await self._attempt(request, client)
                attempt.outcome = "ok"
            except Exception as error:  # noqa: BLE001 (every failure is recorded; the checks judge it)
                attempt.outcome = error_kind(error)
            except asyncio.CancelledError:
                attempt.outcome = "cancelled"
                raise
            finally:
                attempt.ended = time.monotonic()
            if attempt.outcome == "ok":
                request.completed_at = attempt.ended
                async with self._done:
                    self._done.notify_all()
                return
            await asyncio.sleep(pause)
            pause = min(1.0, pause * 2)

    async def _attempt(self, request: Request, client: openai.AsyncOpenAI) -> None:
        headers = {"Idempotency-Key": request.key}
        if request.session_id is not None:
            headers["X-Session-Id"] = request.session_id
        messages: list[openai.types.chat.ChatCompletionMessageParam] = [
            {"role": "user", "content": request.text}
        ]
        expected = self._answer(request.text)
        if not request.stream:
            async with _before_any_answer():
                reply = await client.chat.completions.create(
                    model="veil", messages=messages, extra_headers=headers
                )
            content = reply.choices[0].message.content or ""
            sid = (reply.model_extra or {}).get("session_id")
            completion_id = reply.id
        else:
            async with _before_any_answer():
                stream = await client.chat.completions.create(
                    model="veil", messages=messages, extra_headers=headers, stream=True
                )
            sid = stream.response.headers.get("x-session-id")
            parts: list[str] = []
            finish, completion_id = None, ""
            async for chunk in stream:
                completion_id = chunk.id
                if chunk.choices:
                    choice = chunk.choices[0]
                    if choice.delta.content:
                        parts.append(choice.delta.content)
                        request.chunks += 1
                    finish = choice.finish_reason or finish
            if finish is None:
                raise _Failed("truncated")
            content = "".join(parts)
        if content != expected:
            raise _Failed("wrong_answer")
        request.content, request.completion_id = content, completion_id
        request.answered_session = sid if isinstance(sid, str) else None


@contextlib.asynccontextmanager
async def _before_any_answer() -> AsyncIterator[None]:
    """Until the answer begins (a stream's headers, a JSON body): a connection closed
    under the request is `closed`, not `dropped` (a break in the middle of an answer)."""
    try:
        yield
    except openai.APIConnectionError as error:
        if isinstance(error, openai.APITimeoutError) or isinstance(
            error.__cause__, httpx.ConnectError
        ):
            raise
        raise _Failed("closed") from error


class _Failed(Exception):
    """An answer that came back whole in form but not in substance."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind
