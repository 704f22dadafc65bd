"""Fake OpenAI and Anthropic upstream servers for tests and benchmarks.

They are real aiohttp HTTP servers on 127.0.0.1 speaking the providers' wire formats (checked
against the official SDKs' types and SSE parsers), so the `openai` / `anthropic` SDKs and Veil's
own upstream clients talk to them unchanged. Replies are deterministic ("echo: <last user text>"
unless `reply` is set), every request is recorded, and failures can be injected at any time.
A reply may also be a `ToolCalls` (the model asks for tool calls); a callable reply sees the
request body, so a test can script a tool loop:

    def reply(body):  # call the tool until its result is in the conversation, then answer
        if any(m.get("role") == "tool" for m in body["messages"]):
            return "it is sunny"
        return ToolCalls([("get_weather", {"city": "Paris"})])

    async with FakeOpenAI() as up:          # on the running loop
        client = AsyncOpenAI(base_url=up.base_url, api_key="x")

    up = FakeAnthropic().start_in_thread()  # own loop in a thread, for sync code
    ...
    up.stop_thread()

    python -m testkit.upstreams openai --port 0   # prints "listening on http://127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Self

import msgspec
from aiohttp import web

__all__ = [
    "FakeAnthropic",
    "FakeOpenAI",
    "Fault",
    "RecordedRequest",
    "Reply",
    "ToolCalls",
    "split_arguments",
    "split_tokens",
]

_encode = msgspec.json.encode  # compact JSON, like the real APIs send
_decode = msgspec.json.decode

# A "token" is a word with its leading whitespace (trailing whitespace sticks to the last one),
# so the pieces always join back to the exact text.
_TOKEN = re.compile(r"\s*\S+\s*$|\s*\S+|\s+$")

# Streamed tool-call arguments come in pieces like a model's tokens: runs of word characters,
# of whitespace and of punctuation, e.g. '{"city":"Paris"}' -> '{"', 'city', '":"', 'Paris', '"}'.
_ARG_PIECE = re.compile(r"\w+|\s+|[^\w\s]+")


@dataclass(frozen=True, slots=True)
class ToolCalls:
    """A reply in which the model calls tools (after an optional text), instead of only text.

    Each call is (function name, arguments): a dict (sent as compact JSON) or the raw JSON text
    the model wrote, sent unchanged, so it may be deliberately broken ('{"city": "Par').
    OpenAI answers with `tool_calls` and finish_reason "tool_calls"; Anthropic with a `tool_use`
    block per call and stop_reason "tool_use". max_tokens does not apply. An empty `calls` is a
    plain text reply."""

    calls: list[tuple[str, dict[str, Any] | str]]
    text: str = ""


Reply = str | ToolCalls | Callable[[dict[str, Any]], str | ToolCalls]
"""A fixed reply (text or tool calls), or a function of the parsed request body returning one."""


def split_tokens(text: str) -> list[str]:
    """Split text into the fake's "tokens" (streamed deltas), e.g. "a b" -> ["a", " b"]."""
    return _TOKEN.findall(text)


def split_arguments(arguments: str) -> list[str]:
    """Split tool-call arguments into their streamed pieces; they join back to the exact text."""
    return _ARG_PIECE.findall(arguments)


@dataclass(frozen=True, slots=True)
class _Call:
    """One tool call of a ToolCalls reply, ready to send."""

    id: str  # call_... / toolu_...
    name: str
    arguments: str  # the JSON text
    raw: dict[str, Any] | str  # as given: Anthropic's non-streamed `input` wants the object
    pieces: list[str]  # split_arguments(arguments)


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected misbehaviour, applied to one chat request (fields combine)."""

    status: int | None = None  # answer with this HTTP error (provider's error JSON) instead
    message: str | None = None  # error message; a provider-like default when None
    retry_after: float | None = None  # sent as the Retry-After header with the error
    delay: float = 0.0  # sleep before answering at all (provokes client timeouts)
    # Streamed content deltas: the text's; with ToolCalls also each argument piece (and on
    # OpenAI the chunk announcing each call).
    token_delay: float = 0.0  # sleep before each streamed content delta
    break_after: int | None = None  # drop the connection after this many content deltas
    # Answer only once the test sets it (after `delay`): a turn provably still running.
    hold: threading.Event | None = None


@dataclass(slots=True)
class RecordedRequest:
    """A request as the fake received it."""

    method: str
    path: str  # e.g. "/v1/chat/completions"
    headers: dict[str, str]  # names lower-cased
    body: Any  # parsed JSON body; None when there was none or it was not JSON
    # "pending" while being answered, then "ok", "error" (an error status was sent),
    # "broken" (connection dropped by break_stream_after) or "disconnected" (client went away).
    outcome: str = "pending"


class _FakeUpstream:
    """Server plumbing, recording and failure injection shared by both providers."""

    _url_suffix: ClassVar[str] = ""  # what base_url adds to url for this provider's SDK
    _id_prefix: ClassVar[str] = "id_"
    _call_id_prefix: ClassVar[str] = "call_"
    _models: ClassVar[tuple[str, ...]] = ()  # what GET /v1/models lists by default

    def __init__(
        self,
        *,
        api_key: str | None = None,
        reply: Reply | None = None,
        models: tuple[str, ...] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.api_key = api_key  # when set, requests must carry it
        self.models = self._models if models is None else models
        self.reply = reply  # None: f"echo: {last user message text}"
        self.host = host
        self.port = port  # the real port once started
        self.requests: list[RecordedRequest] = []
        self._faults: deque[Fault] = deque()
        self._sticky: Fault | None = None  # applies to every request once the queue is empty
        self._lock = threading.Lock()  # test code injects from other threads
        self._ids = itertools.count(1)
        self._call_ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- addresses ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Root URL, e.g. http://127.0.0.1:PORT."""
        if self._runner is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What to pass as the SDK client's base_url."""
        return self.url + self._url_suffix

    # -- recording ---------------------------------------------------------------------------

    @property
    def last_request(self) -> RecordedRequest:
        if not self.requests:
            raise LookupError(f"{type(self).__name__} has received no requests")
        return self.requests[-1]

    # -- failure injection -------------------------------------------------------------------

    def inject(self, fault: Fault, times: int | None = 1) -> None:
        """Apply `fault` to the next `times` chat requests (queued behind earlier faults);
        times=None applies it to every chat request once the queue is empty, until reset()."""
        with self._lock:
            if times is None:
                self._sticky = fault
            else:
                self._faults.extend([fault] * times)

    def fail_next(
        self,
        status: int,
        message: str | None = None,
        times: int | None = 1,
        retry_after: float | None = None,
    ) -> None:
        self.inject(Fault(status=status, message=message, retry_after=retry_after), times)

    def delay(self, seconds: float, times: int | None = 1) -> None:
        self.inject(Fault(delay=seconds), times)

    def hold(self, times: int | None = 1) -> threading.Event:
        """The next chat requests wait until the returned event is set."""
        gate = threading.Event()
        self.inject(Fault(hold=gate), times)
        return gate

    def pending(self) -> int:
        """Chat requests received and not answered yet."""
        return sum(r.outcome == "pending" for r in self.requests)

    def token_delay(self, seconds: float, times: int | None = 1) -> None:
        self.inject(Fault(token_delay=seconds), times)

    def break_stream_after(self, n_deltas: int, times: int | None = 1) -> None:
        """Streaming: drop the connection after n content deltas (no final chunk / [DONE]).
        Non-streaming: drop the connection without answering."""
        self.inject(Fault(break_after=n_deltas), times)

    def reset(self) -> None:
        """Forget injected faults and recorded requests (api_key and reply stay)."""
        with self._lock:
            self._faults.clear()
            self._sticky = None
            self.requests.clear()

    def _take_fault(self) -> Fault | None:
        if not self._faults and self._sticky is None:  # the benchmark path: no lock
            return None
        with self._lock:
            return self._faults.popleft() if self._faults else self._sticky

    # -- provider hooks ----------------------------------------------------------------------

    def _add_routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    def _auth_error(self, headers: dict[str, str]) -> web.Response | None:
        raise NotImplementedError

    def _error(
        self, status: int, message: str | None, retry_after: float | None = None
    ) -> web.Response:
        raise NotImplementedError

    def _invalid(self, body: Any) -> str | None:
        """Why the chat request body is unacceptable, or None."""
        raise NotImplementedError

    def _prompt(self, body: dict[str, Any]) -> tuple[int, str]:
        """(prompt token count, last user message text)."""
        raise NotImplementedError

    def _max_tokens(self, body: dict[str, Any]) -> int | None:
        raise NotImplementedError

    def _response_headers(self, request_id: str) -> dict[str, str]:
        raise NotImplementedError

    def _completion(
        self, body: dict[str, Any], rid: str, tokens: list[str], truncated: bool, prompt_tokens: int
    ) -> bytes:
        raise NotImplementedError

    def _stream_frames(
        self, body: dict[str, Any], rid: str, tokens: list[str], truncated: bool, prompt_tokens: int
    ) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """SSE frames: (before the content deltas, one per content delta, after them)."""
        raise NotImplementedError

    def _tool_completion(
        self,
        body: dict[str, Any],
        rid: str,
        tokens: list[str],
        calls: list[_Call],
        prompt_tokens: int,
    ) -> bytes:
        raise NotImplementedError

    def _tool_stream_frames(
        self,
        body: dict[str, Any],
        rid: str,
        tokens: list[str],
        calls: list[_Call],
        prompt_tokens: int,
    ) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """Like _stream_frames; the deltas are the text deltas, then each call's argument
        pieces (OpenAI: and the chunk announcing each call)."""
        raise NotImplementedError

    # -- request handling --------------------------------------------------------------------

    async def _authorized(
        self, request: web.Request
    ) -> tuple[RecordedRequest, web.Response | None]:
        """Record a request; the provider's error response when its credentials are wrong."""
        rec = await self._record(request)
        denied = self._auth_error(rec.headers)
        if denied is not None:
            rec.outcome = "error"
        return rec, denied

    async def _record(self, request: web.Request) -> RecordedRequest:
        raw = await request.read()
        try:
            body = _decode(raw) if raw else None
        except msgspec.DecodeError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        rec = RecordedRequest(request.method, request.path, headers, body)
        self.requests.append(rec)
        return rec

    def _answer(self, body: dict[str, Any], last_user: str) -> str | ToolCalls:
        reply = self.reply
        if reply is None:
            return f"echo: {last_user}"
        if isinstance(reply, str):
            return reply
        answer = reply if isinstance(reply, ToolCalls) else reply(body)
        if isinstance(answer, ToolCalls) and not answer.calls:
            return answer.text
        return answer

    def _calls(self, answer: ToolCalls) -> list[_Call]:
        calls = []
        for name, raw in answer.calls:
            arguments = raw if isinstance(raw, str) else _encode(raw).decode()
            call_id = f"{self._call_id_prefix}{next(self._call_ids):08d}"
            calls.append(_Call(call_id, name, arguments, raw, split_arguments(arguments)))
        return calls

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        rec = await self._record(request)
        resp: web.StreamResponse | None = None
        try:
            if (denied := self._auth_error(rec.headers)) is not None:
                rec.outcome = "error"
                return denied
            body = rec.body
            if (problem := self._invalid(body)) is not None:
                rec.outcome = "error"
                return self._error(400, problem)
            fault = self._take_fault()
            if fault is not None:
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                if fault.hold is not None:
                    await asyncio.get_running_loop().run_in_executor(None, fault.hold.wait)
                if fault.status is not None:
                    rec.outcome = "error"
                    return self._error(fault.status, fault.message, fault.retry_after)
            prompt_tokens, last_user = self._prompt(body)
            answer = self._answer(body, last_user)
            calls: list[_Call] | None = None
            if isinstance(answer, str):
                tokens = split_tokens(answer)
                limit = self._max_tokens(body)
                truncated = limit is not None and len(tokens) > limit
                if truncated:
                    tokens = tokens[:limit]
            else:
                tokens, truncated, calls = split_tokens(answer.text), False, self._calls(answer)
            rid = f"{self._id_prefix}{next(self._ids):08d}"
            headers = self._response_headers(rid)

            if not body.get("stream"):
                if fault is not None and fault.break_after is not None:
                    return self._drop(request, rec)
                rec.outcome = "ok"
                return web.Response(
                    body=self._completion(body, rid, tokens, truncated, prompt_tokens)
                    if calls is None
                    else self._tool_completion(body, rid, tokens, calls, prompt_tokens),
                    headers=headers,
                    content_type="application/json",
                )

            head, deltas, tail = (
                self._stream_frames(body, rid, tokens, truncated, prompt_tokens)
                if calls is None
                else self._tool_stream_frames(body, rid, tokens, calls, prompt_tokens)
            )
            resp = web.StreamResponse(headers=headers)
            resp.content_type = "text/event-stream"
            resp.charset = "utf-8"
            await resp.prepare(request)
            if fault is None or (not fault.token_delay and fault.break_after is None):
                rec.outcome = "ok"
                await resp.write(b"".join([*head, *deltas, *tail]))  # one write: keep it fast
            else:
                await resp.write(b"".join(head))
                n = len(deltas)
                if fault.break_after is not None:
                    n = min(fault.break_after, n)
                for frame in deltas[:n]:
                    if fault.token_delay:
                        await asyncio.sleep(fault.token_delay)
                    await resp.write(frame)
                if fault.break_after is not None:
                    return self._drop(request, rec, resp)
                rec.outcome = "ok"  # before the last write: a client may look as soon as it reads
                await resp.write(b"".join(tail))
            await resp.write_eof()
            return resp
        except asyncio.CancelledError:  # the client went away (handler_cancellation)
            rec.outcome = "disconnected"
            raise
        except ConnectionError:  # a write hit a dead socket
            rec.outcome = "disconnected"
            if resp is None:
                raise
            return resp  # aiohttp's own write_eof then fails quietly

    def _drop(
        self, request: web.Request, rec: RecordedRequest, resp: web.StreamResponse | None = None
    ) -> web.StreamResponse:
        # close() flushes what was written, then FIN: the client sees a truncated chunked body.
        # aiohttp's final write_eof then hits the closed transport and is ignored quietly.
        rec.outcome = "broken"
        if request.transport is not None:
            request.transport.close()
        return resp if resp is not None else web.Response()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> Self:
        """Start serving on the running loop."""
        if self._runner is not None:
            raise RuntimeError(f"{type(self).__name__} is already started")
        app = web.Application()
        self._add_routes(app.router)
        # handler_cancellation: a client disconnect cancels its handler, so delayed requests
        # end with their client; short shutdown_timeout so stop() never hangs on them.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self._runner = runner
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def start_in_thread(self) -> Self:
        """Serve from a background thread with its own loop (for sync clients)."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} is already running in a thread")
        loop = asyncio.new_event_loop()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                started.set_exception(exc)
                loop.close()
                return
            started.set_result(None)
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.stop())
                # Whatever is still alive (e.g. a cancelled handler) must finish before close().
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name=f"{type(self).__name__}-server", daemon=True)
        thread.start()
        started.result()
        self._thread, self._loop = thread, loop
        return self

    def stop_thread(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        self._thread = self._loop = None
        loop.call_soon_threadsafe(loop.stop)
        thread.join()

    def __enter__(self) -> Self:
        return self.start_in_thread()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_thread()


def _text_of(content: Any) -> str:
    """Text of a message's content: a string or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _counted_text_of(content: Any) -> str:
    """What counts as prompt: the text, and Anthropic's tool_use (name, input as JSON) and
    tool_result (its content) blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = []
    for p in content:
        if not isinstance(p, dict):
            continue
        if isinstance(text := p.get("text"), str):
            texts.append(text)
        elif p.get("type") == "tool_use":
            texts.append(f"{p.get('name')} {_json_text(p.get('input'))}")
        elif p.get("type") == "tool_result":
            texts.append(_counted_text_of(p.get("content")))
    return " ".join(texts)


def _json_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    try:
        return _encode(value).decode()
    except TypeError:  # not JSON-able: cannot come from a parsed body
        return ""


def _only_tool_results(content: Any) -> bool:
    """An Anthropic user turn that only returns tool results: not what the user said."""
    return (
        isinstance(content, list)
        and bool(content)
        and all(isinstance(p, dict) and p.get("type") == "tool_result" for p in content)
    )


def _prompt_of(messages: list[Any], extra: str = "") -> tuple[int, str]:
    """(prompt "tokens": whitespace-separated words, text of the last user message). Tool calls
    and results count as prompt; OpenAI's role "tool" messages and Anthropic's user turns of
    tool_result blocks only are not the last user message."""
    count = len(extra.split())
    last_user = ""
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, str):  # the common case first
            count += len(content.split())
            if m.get("role") == "user":
                last_user = content
        elif content is not None:
            count += len(_counted_text_of(content).split())
            if m.get("role") == "user" and not _only_tool_results(content):
                last_user = _text_of(content)
        if (tool_calls := m.get("tool_calls")) and isinstance(tool_calls, list):  # OpenAI
            for call in tool_calls:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    text = f"{function.get('name')} {_json_text(function.get('arguments'))}"
                    count += len(text.split())
    return count, last_user


# ---------------------------------------------------------------------------------------------
# OpenAI Chat Completions


_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    # status: (error.type, error.code, default message)
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


class FakeOpenAI(_FakeUpstream):
    """Fake OpenAI: POST /v1/chat/completions (plain and SSE), GET /v1/models."""

    _url_suffix = "/v1"
    _id_prefix = "chatcmpl-fake"
    _call_id_prefix = "call_fake"
    _models = ("gpt-4o-mini", "gpt-4o")

    def _add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/chat/completions", self._handle_chat)
        router.add_get("/v1/models", self._handle_models)

    async def _handle_models(self, request: web.Request) -> web.Response:
        rec, denied = await self._authorized(request)
        if denied is not None:
            return denied
        rec.outcome = "ok"
        data = [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "openai"}
            for m in self.models
        ]
        return web.Response(
            body=_encode({"object": "list", "data": data}), content_type="application/json"
        )

    def _auth_error(self, headers: dict[str, str]) -> web.Response | None:
        if self.api_key is None:
            return None
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return self._error(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code=None,
            )
        if auth[7:] != self.api_key:
            return self._error(401, f"Incorrect API key provided: {auth[7:11]}****.")
        return None

    def _error(
        self,
        status: int,
        message: str | None,
        retry_after: float | None = None,
        *,
        code: str | None | bool = True,
    ) -> web.Response:
        etype, default_code, default_message = _OPENAI_ERRORS.get(
            status,
            ("server_error", None, f"Error {status}")
            if status >= 500
            else ("invalid_request_error", None, f"Error {status}"),
        )
        error = {
            "message": message if message is not None else default_message,
            "type": etype,
            "param": None,
            "code": default_code if code is True else code,
        }
        headers = {"x-request-id": f"req_fake{next(self._ids):08d}"}
        if retry_after is not None:
            headers["retry-after"] = f"{retry_after:g}"
        return web.Response(
            status=status,
            body=_encode({"error": error}),
            headers=headers,
            content_type="application/json",
        )

    def _invalid(self, body: Any) -> str | None:
        if not isinstance(body, dict):
            return "We could not parse the JSON body of your request."
        if not isinstance(body.get("model"), str):
            return "you must provide a model parameter"
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return "Missing required parameter: 'messages'."
        return None

    def _prompt(self, body: dict[str, Any]) -> tuple[int, str]:
        return _prompt_of(body["messages"])

    def _max_tokens(self, body: dict[str, Any]) -> int | None:
        limit = body.get("max_completion_tokens")
        return body.get("max_tokens") if limit is None else limit

    def _response_headers(self, request_id: str) -> dict[str, str]:
        return {"x-request-id": "req_" + request_id}

    def _completion(
        self, body: dict[str, Any], rid: str, tokens: list[str], truncated: bool, prompt_tokens: int
    ) -> bytes:
        return _encode(
            {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                # With n > 1, choice i says the same, marked "(choice i)".
                "choices": [
                    {
                        "index": i,
                        "message": {
                            "role": "assistant",
                            "content": "".join(tokens) + (f" (choice {i})" if i else ""),
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": "length" if truncated else "stop",
                    }
                    for i in range(int(body.get("n") or 1))
                ],
                "usage": _openai_usage(prompt_tokens, len(tokens)),
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
        )

    def _tool_completion(
        self,
        body: dict[str, Any],
        rid: str,
        tokens: list[str],
        calls: list[_Call],
        prompt_tokens: int,
    ) -> bytes:
        tool_calls = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in calls
        ]
        return _encode(
            {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "".join(tokens) if tokens else None,
                            "tool_calls": tool_calls,
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": "tool_calls",
                    }
                ],
                "usage": _openai_usage(prompt_tokens, _output_tokens(tokens, calls)),
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
        )

    def _stream_frames(
        self, body: dict[str, Any], rid: str, tokens: list[str], truncated: bool, prompt_tokens: int
    ) -> tuple[list[bytes], list[bytes], list[bytes]]:
        return self._frames(
            body,
            rid,
            {"role": "assistant", "content": "", "refusal": None},
            ({"content": t} for t in tokens),
            "length" if truncated else "stop",
            prompt_tokens,
            len(tokens),
        )

    def _tool_stream_frames(
        self,
        body: dict[str, Any],
        rid: str,
        tokens: list[str],
        calls: list[_Call],
        prompt_tokens: int,
    ) -> tuple[list[bytes], list[bytes], list[bytes]]:
        # Like the real API: the first chunk for a call has its id, type, name and empty
        # arguments; the following ones only the index and an arguments piece. (The SDK's
        # stream helper concatenates repeated strings, so id and name must come only once.)
        deltas: list[dict[str, Any]] = [{"content": t} for t in tokens]
        for i, c in enumerate(calls):
            announce = {"index": i, "id": c.id, "type": "function"}
            deltas.append(
                {"tool_calls": [{**announce, "function": {"name": c.name, "arguments": ""}}]}
            )
            deltas.extend(
                {"tool_calls": [{"index": i, "function": {"arguments": piece}}]}
                for piece in c.pieces
            )
        return self._frames(
            body,
            rid,
            {"role": "assistant", "content": "" if tokens else None, "refusal": None},
            deltas,
            "tool_calls",
            prompt_tokens,
            _output_tokens(tokens, calls),
        )

    def _frames(
        self,
        body: dict[str, Any],
        rid: str,
        first: dict[str, Any],
        deltas: Iterable[dict[str, Any]],
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> tuple[list[bytes], list[bytes], list[bytes]]:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        base: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body["model"],
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }

        def frame(delta: dict[str, Any], finish_reason: str | None = None, index: int = 0) -> bytes:
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            chunk = {**base, "choices": [choice]}
            if include_usage:
                chunk["usage"] = None  # the real API sends null until the usage chunk
            return b"data: " + _encode(chunk) + b"\n\n"

        n = int(body.get("n") or 1)
        if n > 1:
            # Choice i streams the same text, then " (choice i)", interleaved as OpenAI does.
            deltas = list(deltas)
            frames = [frame(d, index=i) for d in deltas for i in range(n)]
            frames += [frame({"content": f" (choice {i})"}, index=i) for i in range(1, n)]
            tail = [frame({}, finish_reason, index=i) for i in range(n)]
            if include_usage:
                usage = _openai_usage(prompt_tokens, completion_tokens * n)
                tail.append(b"data: " + _encode({**base, "choices": [], "usage": usage}) + b"\n\n")
            tail.append(b"data: [DONE]\n\n")
            return [frame(first, index=i) for i in range(n)], frames, tail

        head = [frame(first)]
        tail = [frame({}, finish_reason)]
        if include_usage:
            usage = _openai_usage(prompt_tokens, completion_tokens)
            tail.append(b"data: " + _encode({**base, "choices": [], "usage": usage}) + b"\n\n")
        tail.append(b"data: [DONE]\n\n")
        return head, [frame(d) for d in deltas], tail


def _output_tokens(tokens: list[str], calls: list[_Call]) -> int:
    """Output "tokens" of a tool-calls reply: the text's, one per call name, its arguments'."""
    return len(tokens) + sum(1 + len(c.pieces) for c in calls)


def _openai_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


# ---------------------------------------------------------------------------------------------
# Anthropic Messages


_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    # status: (error.type, default message)
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low."),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}


class FakeAnthropic(_FakeUpstream):
    """Fake Anthropic: POST /v1/messages (plain and SSE), POST /v1/messages/count_tokens,
    GET /v1/models. Like the real API it requires the anthropic-version header."""

    _id_prefix = "msg_fake"
    _call_id_prefix = "toolu_fake"
    _models = ("claude-sonnet-4-5", "claude-haiku-4-5")

    def _add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/messages", self._handle_chat)
        router.add_post("/v1/messages/count_tokens", self._handle_count_tokens)
        router.add_get("/v1/models", self._handle_models)

    async def _handle_count_tokens(self, request: web.Request) -> web.Response:
        rec, denied = await self._authorized(request)
        if denied is not None:
            return denied
        body = rec.body
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            rec.outcome = "error"
            return self._error(400, "messages: Field required")
        rec.outcome = "ok"
        count, _ = self._prompt(body)
        return web.Response(body=_encode({"input_tokens": count}), content_type="application/json")

    async def _handle_models(self, request: web.Request) -> web.Response:
        rec, denied = await self._authorized(request)
        if denied is not None:
            return denied
        rec.outcome = "ok"
        data = [
            {
                "type": "model",
                "id": m,
                "display_name": m,
                "created_at": "2025-01-01T00:00:00Z",
                "lifecycle": "active",
            }
            for m in self.models
        ]
        page = {
            "data": data,
            "has_more": False,
            "first_id": self.models[0] if self.models else None,
            "last_id": self.models[-1] if self.models else None,
        }
        return web.Response(body=_encode(page), content_type="application/json")

    def _auth_error(self, headers: dict[str, str]) -> web.Response | None:
        if self.api_key is not None:
            # The classic header is x-api-key; anthropic SDK 2.x sends the key as a Bearer token.
            key = headers.get("x-api-key")
            if key is None and headers.get("authorization", "").startswith("Bearer "):
                key = headers["authorization"][7:]
            if key is None:
                return self._error(401, "x-api-key header is required")
            if key != self.api_key:
                return self._error(401, "invalid x-api-key")
        if "anthropic-version" not in headers:
            return self._error(400, "anthropic-version: header is required")
        return None

    def _error(
        self, status: int, message: str | None, retry_after: float | None = None
    ) -> web.Response:
        etype, default_message = _ANTHROPIC_ERRORS.get(
            status,
            ("api_error", "Internal server error")
            if status >= 500
            else ("invalid_request_error", f"Error {status}"),
        )
        request_id = f"req_fake{next(self._ids):08d}"
        error = {"type": etype, "message": message if message is not None else default_message}
        headers = {"request-id": request_id}
        if retry_after is not None:
            headers["retry-after"] = f"{retry_after:g}"
        return web.Response(
            status=status,
            reason="Overloaded" if status == 529 else None,  # not in http.HTTPStatus
            body=_encode({"type": "error", "error": error, "request_id": request_id}),
            headers=headers,
            content_type="application/json",
        )

    def _invalid(self, body: Any) -> str | None:
        if not isinstance(body, dict):
            return "There was an issue with your request body: it is not valid JSON."
        if not isinstance(body.get("model"), str):
            return "model: Field required"
        if not isinstance(body.get("messages"), list):
            return "messages: Field required"
        if not isinstance(body.get("max_tokens"), int):
            return "max_tokens: Field required"
        return None

    def _prompt(self, body: dict[str, Any]) -> tuple[int, str]:
        return _prompt_of(body["messages"], _text_of(body.get("system")))

    def _max_tokens(self, body: dict[str, Any]) -> int | None:
        limit: int = body["max_tokens"]
        return limit

    def _response_headers(self, request_id: str) -> dict[str, str]:
        return {"request-id": "req_" + request_id}

    def _message(
        self,
        body: dict[str, Any],
        rid: str,
        text: str | None,
        stop_reason: str | None,
        usage: Any,
        content: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        if content is None:
            content = [] if text is None else [{"type": "text", "text": text}]
        return {
            "id": rid,
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }

    def _completion(
        self, body: dict[str, Any], rid: str, tokens: list[str], truncated: bool, prompt_tokens: int
    ) -> bytes:
        usage = _anthropic_usage(prompt_tokens, len(tokens))
        stop_reason = "max_tokens" if truncated else "end_turn"
        return _encode(self._message(body, rid, "".join(tokens), stop_reason, usage))

    def _tool_completion(
        self,
        body: dict[str, Any],
        rid: str,
        tokens: list[str],
        calls: list[_Call],
        prompt_tokens: int,
    ) -> bytes:
        content = [{"type": "text", "text": "".join(tokens)}] if tokens else []
        content.extend(
            {"type": "tool_use", "id": c.id, "name": c.name, "input": _tool_input(c.raw)}
            for c in calls
        )
        usage = _anthropic_usage(prompt_tokens, _output_tokens(tokens, calls))
        return _encode(self._message(body, rid, None, "tool_use", usage, content))

    def _tool_stream_frames(
        self,
        body: dict[str, Any],
        rid: str,
        tokens: list[str],
        calls: list[_Call],
        prompt_tokens: int,
    ) -> tuple[list[bytes], list[bytes], list[bytes]]:
        # Blocks in order: the text (if any), then a tool_use per call, its input streamed as
        # input_json_delta pieces of the raw JSON text (broken or not, as given). The first
        # block's start and the ping are the head; the later blocks' stop/start events go
        # with their first delta, so only text and argument pieces count as deltas.
        start = self._message(body, rid, None, None, _anthropic_usage(prompt_tokens, 1))
        head = [_sse("message_start", {"type": "message_start", "message": start})]
        deltas: list[bytes] = []
        blocks: list[tuple[dict[str, Any], list[bytes]]] = []
        if tokens:
            blocks.append(({"type": "text", "text": ""}, [_text_delta(0, t) for t in tokens]))
        for c in calls:
            i = len(blocks)
            block = {"type": "tool_use", "id": c.id, "name": c.name, "input": {}}
            blocks.append((block, [_json_delta(i, piece) for piece in c.pieces]))
        pending: list[bytes] = []  # structural events waiting for the next delta
        for i, (block, frames) in enumerate(blocks):
            if i:
                pending.append(_block_stop(i - 1))
            pending.append(
                _sse(
                    "content_block_start",
                    {"type": "content_block_start", "index": i, "content_block": block},
                )
            )
            if not i:
                head.extend(pending)
                head.append(_sse("ping", {"type": "ping"}))
                pending = []
            for frame in frames:
                deltas.append(b"".join([*pending, frame]) if pending else frame)
                pending = []
        tail = [
            *pending,
            _block_stop(len(blocks) - 1),
            *_message_end("tool_use", _output_tokens(tokens, calls)),
        ]
        return head, deltas, tail

    def _stream_frames(
        self, body: dict[str, Any], rid: str, tokens: list[str], truncated: bool, prompt_tokens: int
    ) -> tuple[list[bytes], list[bytes], list[bytes]]:
        # Like the real API: a token or so of output at message_start; message_delta then
        # carries the cumulative total, which clients must take rather than add.
        start = self._message(body, rid, None, None, _anthropic_usage(prompt_tokens, 1))
        block = {"type": "text", "text": ""}
        head = [
            _sse("message_start", {"type": "message_start", "message": start}),
            _sse(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": block},
            ),
            _sse("ping", {"type": "ping"}),
        ]
        deltas = [_text_delta(0, t) for t in tokens]
        tail = [
            _block_stop(0),
            *_message_end("max_tokens" if truncated else "end_turn", len(tokens)),
        ]
        return head, deltas, tail


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encode(data) + b"\n\n"


def _text_delta(index: int, text: str) -> bytes:
    delta = {"type": "text_delta", "text": text}
    return _sse(
        "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
    )


def _json_delta(index: int, piece: str) -> bytes:
    delta = {"type": "input_json_delta", "partial_json": piece}
    return _sse(
        "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
    )


def _block_stop(index: int) -> bytes:
    return _sse("content_block_stop", {"type": "content_block_stop", "index": index})


def _message_end(stop_reason: str, output_tokens: int) -> list[bytes]:
    delta = {"stop_reason": stop_reason, "stop_sequence": None}
    return [
        _sse(
            "message_delta",
            {"type": "message_delta", "delta": delta, "usage": {"output_tokens": output_tokens}},
        ),
        _sse("message_stop", {"type": "message_stop"}),
    ]


def _tool_input(raw: dict[str, Any] | str) -> Any:
    """A tool_use block's `input`: the arguments object; raw JSON text is parsed, and sent
    unchanged as a string when it is not valid JSON (the real API always sends an object)."""
    if not isinstance(raw, str):
        return raw
    try:
        return _decode(raw)
    except msgspec.DecodeError:
        return raw


def _anthropic_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


# ---------------------------------------------------------------------------------------------
# Separate-process entry point (benchmarks)


async def _serve(args: argparse.Namespace) -> None:
    cls = FakeOpenAI if args.provider == "openai" else FakeAnthropic
    up = cls(api_key=args.api_key, reply=args.reply, host=args.host, port=args.port)
    if args.delay or args.token_delay:
        up.inject(Fault(delay=args.delay, token_delay=args.token_delay), times=None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with up:
        print(f"listening on {up.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m testkit.upstreams", description="Run a fake LLM upstream server."
    )
    parser.add_argument("provider", choices=["openai", "anthropic"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=None, help="require this key")
    parser.add_argument("--reply", default=None, help="fixed reply text (default: echo)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds per streamed delta")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
