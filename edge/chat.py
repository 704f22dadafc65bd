"""POST /v1/chat/completions: OpenAI's chat API, relayed to a session actor on NATS; and
the turn every door runs (`run_chat_turn`): a door translates its request into a chat
request and answers in its own shape (`Door`), the rest is one path."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import msgspec
import structlog
from aiohttp import web

from bus.codec import encode
from bus.subjects import MAX_ID_LENGTH, is_valid_id
from config import local_install_command
from contracts.session import Delta, StartTurn, ToolDelta, TurnDone, TurnError
from edge.admission import Admission, admitted
from edge.auth import Principal, require_scope
from edge.budgets import enforce_budgets
from edge.metrics import limit_hit
from edge.models import unknown_model
from edge.observe import chat_ended, chat_started
from edge.openai_wire import (
    ApiError,
    ChatRequest,
    completion,
    generation_params,
    parse_chat_request,
    to_chat_messages,
)
from edge.openapi import IDEMPOTENCY_KEY, SESSION_ID_HEADER, operation
from edge.relay import ClientGone, TurnRelay, run_turn
from edge.responses import ChatCompletion, ChatCompletionChunk, ErrorBody
from edge.sse import stream_turn
from edge.webkeys import CONFIG, NATS, PRINCIPAL, body_deadline, json_response

__all__ = [
    "IDEMPOTENT_PREFIX",
    "SESSION_HEADER",
    "Door",
    "TurnItem",
    "chat_completions",
    "check_model",
    "command_id_for",
    "read_body",
    "run_chat_turn",
]

log = structlog.get_logger("veil.gateway")

SESSION_HEADER = "X-Session-Id"
# Command ids made from a client's Idempotency-Key start with this.
IDEMPOTENT_PREFIX = "idem_"


def _session_of(request: web.Request, chat: ChatRequest, command_id: str) -> tuple[str, bool]:
    """The session the client names (body, header or metadata), or a new one; and
    whether Veil made the id.

    A name is the client's within its tenant: the session actor continues the tenant's
    session of that name, or opens it on first use (another tenant's is another
    session). A new session's id comes from the command id, so a retry of a first turn
    under the same Idempotency-Key lands on the same session and gets the same answer.
    """
    given = {
        v
        for v in (
            chat.session_id,
            request.headers.get(SESSION_HEADER),
            (chat.metadata or {}).get("session_id"),
        )
        if v
    }
    if len(given) > 1:
        raise ApiError(
            400,
            "The request names more than one session id.",
            param="session_id",
            code="invalid_value",
        )
    if not given:
        return f"sess_{command_id.removeprefix(IDEMPOTENT_PREFIX)}", True
    session_id = given.pop()
    if not is_valid_id(session_id):
        raise ApiError(
            400,
            f"Invalid session id: use 1-{MAX_ID_LENGTH} characters from A-Z, a-z, 0-9, '_' and '-'.",
            param="session_id",
            code="invalid_value",
        )
    return session_id, False


def _fingerprint(start: StartTurn) -> str:
    """What a retry under the same Idempotency-Key must repeat (else 422): the turn's
    content, not how it names its session (a retry may add the id it learned)."""
    metadata = {k: v for k, v in start.metadata.items() if k != "session_id"}
    what = [start.model, start.messages, start.params, start.user_id, metadata, start.stream]
    return hashlib.sha256(encode(what)).hexdigest()


def command_id_for(request: web.Request, principal: Principal) -> str:
    """One id per client request; a client's Idempotency-Key makes its retries the same command."""
    key = request.headers.get("Idempotency-Key")
    if key:
        digest = hashlib.sha256(f"{principal.tenant}\0{key}".encode()).hexdigest()[:32]
        return f"{IDEMPOTENT_PREFIX}{digest}"
    return uuid.uuid4().hex


async def read_body(request: web.Request) -> bytes:
    """The JSON body, sent as such (a web page cannot, across sites) and in time."""
    if request.content_type != "application/json":
        raise ApiError(
            415,
            f"Send the body as JSON with 'Content-Type: application/json' "
            f"(got '{request.content_type[:100]}').",
            code="unsupported_media_type",
        )
    async with body_deadline(request):
        body = await request.read()
    if not body:
        raise ApiError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    return body


def _client_gone(request: web.Request) -> Callable[[], bool]:
    def gone() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    return gone


def _user_of(chat: ChatRequest, principal: Principal) -> str | None:
    """The end user the turn is for: the one the key is pinned to, else whom the client names."""
    named = chat.user or (chat.metadata or {}).get("user_id")
    if principal.user is None:
        return named
    if named is not None and named != principal.user:
        raise ApiError(
            403,
            "This API key acts for one user only; it cannot name another 'user'.",
            param="user",
            code="user_not_allowed",
        )
    return principal.user


@operation(
    "Create a chat completion",
    description="OpenAI's Chat Completions, on a session: send only the new messages of a "
    "session (the model gets the whole conversation), or resend all of it. The answer "
    "carries the session in `session_id` and the X-Session-Id header. With `stream: "
    "true`, server-sent events of chat.completion.chunk objects, then `data: [DONE]` (a "
    "stream that fails after its first event ends with an error object instead).",
    tags=("chat",),
    body=ChatRequest,
    body_examples={
        "one message": {"model": "veil", "messages": [{"role": "user", "content": "Hello"}]},
        "streamed, on a session": {
            "model": "veil",
            "messages": [{"role": "user", "content": "And then?"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "session_id": "sess_8d0f6b4e2c",
        },
    },
    ok=ChatCompletion,
    sse=(ChatCompletionChunk, ErrorBody),
    ok_headers=(SESSION_ID_HEADER,),
    headers=(SESSION_ID_HEADER, IDEMPOTENCY_KEY),
    errors=(400, 404, 408, 413, 415, 422, 502, 503, 504),
    rate_limited=True,
)
async def chat_completions(request: web.Request) -> web.StreamResponse:
    require_scope(request[PRINCIPAL], "chat")
    chat = parse_chat_request(await read_body(request))
    include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
    return await run_chat_turn(request, chat, _ChatDoor(include_usage))


TurnItem = Delta | ToolDelta | TurnDone | TurnError


class Door(Protocol):
    """How one API answers a turn: its whole reply, or its stream."""

    # The API's name, recorded on the turn: "chat.completions", "messages", "responses".
    name: str

    async def complete(self, start: StartTurn, result: TurnDone | TurnError) -> web.Response:
        """The whole reply; a failed turn raises its ApiError."""
        ...

    async def stream(
        self,
        request: web.Request,
        start: StartTurn,
        batches: AsyncIterator[list[TurnItem]],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """The reply as server-sent events (ClientGone when the client left)."""
        ...


class _ChatDoor:
    """OpenAI's chat.completion, or its chunks."""

    name = "chat.completions"

    def __init__(self, include_usage: bool) -> None:
        self._include_usage = include_usage

    async def complete(self, start: StartTurn, result: TurnDone | TurnError) -> web.Response:
        return _complete(start, result)

    async def stream(
        self,
        request: web.Request,
        start: StartTurn,
        batches: AsyncIterator[list[TurnItem]],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        return await stream_turn(request, start, batches, self._include_usage, headers)


def check_model(request: web.Request, model: str) -> None:
    """A 404 for a model the caller may not use or that does not exist (alike), a 503
    when none is configured at all."""
    config = request.app[CONFIG]
    if not request[PRINCIPAL].may_use(model):
        raise unknown_model(model)  # as if it did not exist
    if config.model(model) is None:
        if not config.models:
            raise ApiError(
                503,
                "No upstream model is configured: set OPENAI_BASE_URL/OPENAI_API_KEY or "
                "ANTHROPIC_API_KEY, give a config file with engines and pipelines, or install "
                f"the local model on the server ({local_install_command()}).",
                code="no_upstream",
            )
        raise unknown_model(model)


async def run_chat_turn(
    request: web.Request, chat: ChatRequest, door: Door, command_id: str | None = None
) -> web.StreamResponse:
    """One turn of a chat request, whichever door it came through: the model checked,
    budgets, the session (named, or a new one), idempotency, the rate limits, the relay
    over the bus and what operators see of it; answered through `door`."""
    config = request.app[CONFIG]
    principal: Principal = request[PRINCIPAL]
    check_model(request, chat.model)
    try:
        await enforce_budgets(request.app[NATS], config, principal, chat)
    except ApiError as error:
        if error.status == 429:
            limit_hit(request, "budget")
        raise
    command_id = command_id or command_id_for(request, principal)
    session_id, new_session = _session_of(request, chat, command_id)
    random_id = new_session and not command_id.startswith(IDEMPOTENT_PREFIX)
    start = StartTurn(
        command_id=command_id,
        turn_id=command_id,
        session_id=session_id,
        new_session=new_session,
        random_id=random_id,
        tenant=principal.tenant,
        key_id=principal.key_id,
        model=chat.model,
        messages=to_chat_messages(chat),
        user_id=_user_of(chat, principal),
        user_bound=principal.user is not None,
        metadata=chat.metadata or {},
        params=generation_params(chat),
        stream=bool(chat.stream),
        door=door.name,
    )
    if command_id.startswith(IDEMPOTENT_PREFIX):
        start = msgspec.structs.replace(
            start, fingerprint=_fingerprint(start), request_id=uuid.uuid4().hex
        )
    chat_started(request, start)
    async with admitted(request, chat) as admission:
        return await _relay_turn(request, start, admission, door)


async def _relay_turn(
    request: web.Request, start: StartTurn, admission: Admission, door: Door
) -> web.StreamResponse:
    """The turn over the bus, answered as JSON or SSE; what it used goes to `admission`."""
    config = request.app[CONFIG]
    session_id = start.session_id
    if not start.stream:
        timeout = config.server.accept_timeout + config.server.turn_timeout
        try:
            result = await run_turn(request.app[NATS], start, timeout, _client_gone(request))
        except ClientGone:
            log.info("gateway.client_gone", session=session_id, turn=start.turn_id)
            return web.Response(status=499)
        admission.finished(result)
        chat_ended(request, start, result, None)
        return await door.complete(start, result)
    async with TurnRelay(request.app[NATS], start) as relay:
        try:
            await relay.send(config.server.accept_timeout, _client_gone(request))
        except ClientGone:
            log.info("gateway.client_gone", session=session_id, turn=start.turn_id)
            return web.Response(status=499)
        batches = admission.watch(relay.batches(config.server.turn_timeout, _client_gone(request)))
        try:
            return await door.stream(request, start, batches, {SESSION_HEADER: start.session_id})
        except ClientGone:
            await relay.cancel()
            log.info("gateway.client_gone", session=session_id, turn=start.turn_id)
            # Nobody reads this; aiohttp needs a response object all the same.
            return web.Response(status=499)
        finally:
            chat_ended(request, start, relay.final, relay.first_output)


def _complete(start: StartTurn, item: TurnDone | TurnError) -> web.Response:
    if isinstance(item, TurnError):
        raise ApiError.of(item.error)
    body = completion(
        id=f"chatcmpl-{start.turn_id}",
        created=int(time.time()),
        model=start.model,
        content=item.content,
        finish_reason=item.finish_reason,
        usage=item.usage,
        session_id=start.session_id,
        tool_calls=item.tool_calls,
        alternatives=item.alternatives,
    )
    return json_response(body, headers={SESSION_HEADER: start.session_id})
