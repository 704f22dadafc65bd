"""The HTTP face of Veil: OpenAI's chat API over aiohttp, relayed to session actors on NATS.

The gateway holds no conversation state and never calls a model. It checks
the request, sends a StartTurn command to the session's actor and turns what
comes back on the turn's output subject into an OpenAI response or SSE stream.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import structlog
from aiohttp import web

from bus.codec import encode
from bus.connection import connect
from bus.subjects import MAX_ID_LENGTH, is_valid_id
from config import Config
from contracts.session import (
    DeleteSession,
    GetSession,
    MemoriesFound,
    SearchMemories,
    SessionDeleted,
    SessionView,
    StartTurn,
    TurnDone,
    TurnError,
)
from veil.admin import add_admin_routes
from veil.auth import Authenticator, Principal
from veil.cross_site import refuse_cross_site
from veil.http_guard import ConnectionGuard, guard_middleware
from veil.openai_wire import (
    ApiError,
    ChatRequest,
    completion,
    error_body,
    generation_params,
    parse_chat_request,
    to_chat_messages,
)
from veil.relay import ClientGone, TurnRelay, ask_session, run_turn
from veil.sse import stream_turn
from veil.webkeys import AUTH, CONFIG, GUARD, NATS, PRINCIPAL, body_deadline, json_response

__all__ = ["AUTH", "CONFIG", "NATS", "create_app"]

log = structlog.get_logger("veil.gateway")

SESSION_HEADER = "X-Session-Id"
# Command ids made from a client's Idempotency-Key start with this.
IDEMPOTENT_PREFIX = "idem_"
STARTED = int(time.time())

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_json = json_response


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as an OpenAI-shaped error; a client mistake is never a 500."""
    try:
        return await handler(request)
    except ApiError as error:
        response = _json(error.body(), error.status)
        if error.status in (408, 413):
            # The rest of the body is not wanted: the connection closes after this answer
            # (aiohttp still reads on for its lingering time, see veil/server.py).
            response.force_close()
        return response
    except ConnectionResetError:
        # The client hung up (mid-body, say): nothing to answer and nothing went wrong here.
        log.info("gateway.client_gone", path=request.path)
        return web.Response(status=499)
    except web.HTTPRequestEntityTooLarge as error:
        response = _json(
            error_body(
                f"Request body too large: {error.text}",
                "invalid_request_error",
                "request_too_large",
            ),
            413,
        )
        response.force_close()  # as for ApiError's 413 above: the rest is not read
        return response
    except web.HTTPException as error:
        if error.status < 400:
            raise
        if error.status == 404:
            message = f"Invalid URL ({request.method} {request.path})"
        else:
            message = error.reason
        headers = {k: v for k, v in error.headers.items() if k.lower() != "content-type"}
        return _json(error_body(message, "invalid_request_error", None), error.status, headers)
    except Exception:
        log.exception("gateway.unhandled", path=request.path)
        return _json(
            error_body("The server had an error processing your request.", "server_error", None),
            500,
        )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/v1/"):
        auth = request.app[AUTH]
        if not auth.enabled:
            refuse_cross_site(request)
        request[PRINCIPAL] = auth.authenticate(request.headers.get("Authorization"))
    return await handler(request)


async def list_models(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    return _json({"object": "list", "data": [_model_card(m.name) for m in config.models]})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if request.app[CONFIG].model(name) is None:
        raise _unknown_model(name)
    return _json(_model_card(name))


def _model_card(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": STARTED, "owned_by": "veil"}


def _unknown_model(name: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{name}' does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def _session_of(request: web.Request, chat: ChatRequest, command_id: str) -> tuple[str, bool]:
    """The session the client names (body, header or metadata), or a new one.

    A new session's id comes from the command id, so a retry of a first turn under
    the same Idempotency-Key lands on the same session and gets the same answer.
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


def _command_id(request: web.Request, principal: Principal) -> str:
    """One id per client request; a client's Idempotency-Key makes its retries the same command."""
    key = request.headers.get("Idempotency-Key")
    if key:
        digest = hashlib.sha256(f"{principal.tenant}\0{key}".encode()).hexdigest()[:32]
        return f"{IDEMPOTENT_PREFIX}{digest}"
    return uuid.uuid4().hex


async def _read_body(request: web.Request) -> bytes:
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


async def chat_completions(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    principal: Principal = request[PRINCIPAL]
    body = await _read_body(request)
    chat = parse_chat_request(body)
    if config.model(chat.model) is None:
        if not config.models:
            raise ApiError(
                503,
                "No upstream model is configured: set OPENAI_BASE_URL/OPENAI_API_KEY or "
                "ANTHROPIC_API_KEY, or give a config file with engines and pipelines.",
                code="no_upstream",
            )
        raise _unknown_model(chat.model)
    command_id = _command_id(request, principal)
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
        user_id=chat.user or (chat.metadata or {}).get("user_id"),
        metadata=chat.metadata or {},
        params=generation_params(chat),
        stream=bool(chat.stream),
    )
    if command_id.startswith(IDEMPOTENT_PREFIX):
        start = msgspec.structs.replace(
            start, fingerprint=_fingerprint(start), request_id=uuid.uuid4().hex
        )
    if not chat.stream:
        timeout = config.server.accept_timeout + config.server.turn_timeout
        try:
            result = await run_turn(request.app[NATS], start, timeout, _client_gone(request))
        except ClientGone:
            log.info("gateway.client_gone", session=session_id, turn=start.turn_id)
            return web.Response(status=499)
        return _complete(start, result)
    async with TurnRelay(request.app[NATS], start) as relay:
        try:
            await relay.send(config.server.accept_timeout, _client_gone(request))
        except ClientGone:
            log.info("gateway.client_gone", session=session_id, turn=start.turn_id)
            return web.Response(status=499)
        batches = relay.batches(config.server.turn_timeout, _client_gone(request))
        try:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return await stream_turn(
                request, start, batches, include_usage, {SESSION_HEADER: start.session_id}
            )
        except ClientGone:
            await relay.cancel()
            log.info("gateway.client_gone", session=session_id, turn=start.turn_id)
            # Nobody reads this; aiohttp needs a response object all the same.
            return web.Response(status=499)


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
    return _json(body, headers={SESSION_HEADER: start.session_id})


def _session_id_param(request: web.Request) -> str:
    session_id = request.match_info["session_id"]
    if not is_valid_id(session_id):
        # Never a subject token; and indistinguishable from a session that does not exist.
        raise ApiError(
            404,
            f"No session found with id '{session_id[:MAX_ID_LENGTH]}'.",
            code="session_not_found",
        )
    return session_id


def _session_object(view: SessionView) -> dict[str, object]:
    return {
        "id": view.session_id,
        "object": "session",
        "created_at": int(view.created_at.timestamp()),
        "updated_at": int(view.updated_at.timestamp()),
        "model": view.model,
        "turns": view.turns,
        "usage": {
            "prompt_tokens": view.usage.prompt_tokens,
            "completion_tokens": view.usage.completion_tokens,
            "total_tokens": view.usage.total_tokens,
        },
    }


async def _view(request: web.Request, messages: bool) -> SessionView:
    command = GetSession(
        session_id=_session_id_param(request), tenant=request[PRINCIPAL].tenant, messages=messages
    )
    reply = await ask_session(request.app[NATS], command, request.app[CONFIG].server.accept_timeout)
    if not isinstance(reply, SessionView):
        raise ApiError(500, "Unexpected reply from the session actor.", code="actor_failed")
    return reply


async def get_session(request: web.Request) -> web.Response:
    return _json(_session_object(await _view(request, messages=False)))


async def list_messages(request: web.Request) -> web.Response:
    view = await _view(request, messages=True)
    data = [
        {"id": f"msg_{i}", "object": "session.message", "role": m.role, "content": m.content}
        for i, m in enumerate(view.messages or [])
    ]
    return _json(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": False,
        }
    )


async def search_memories(request: web.Request) -> web.Response:
    query = request.query.get("q", "").strip()
    if not query:
        raise ApiError(
            400,
            "Give the search text as the query parameter 'q'.",
            param="q",
            code="missing_required_parameter",
        )
    try:
        limit = int(request.query.get("limit", "10"))
    except ValueError:
        raise ApiError(
            400, "limit must be an integer.", param="limit", code="invalid_value"
        ) from None
    if not 1 <= limit <= 100:
        raise ApiError(400, "limit must be between 1 and 100.", param="limit", code="invalid_value")
    command = SearchMemories(
        session_id=_session_id_param(request),
        tenant=request[PRINCIPAL].tenant,
        query=query,
        k=limit,
    )
    reply = await ask_session(request.app[NATS], command, request.app[CONFIG].server.accept_timeout)
    if not isinstance(reply, MemoriesFound):
        raise ApiError(500, "Unexpected reply from the session actor.", code="actor_failed")
    data = [
        {
            "id": h.id,
            "object": "session.memory",
            "session_id": h.session_id,
            "role": h.role,
            "kind": h.kind,
            "content": h.text,
            "score": h.score,
            "vector_similarity": h.vector_similarity,
            "bm25": h.bm25,
            "created_at": int(h.created_at.timestamp()),
        }
        for h in reply.hits
    ]
    return _json({"object": "list", "data": data, "has_more": False})


async def delete_session(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    command = DeleteSession(
        session_id=_session_id_param(request), tenant=principal.tenant, key_id=principal.key_id
    )
    reply = await ask_session(request.app[NATS], command, request.app[CONFIG].server.accept_timeout)
    if not isinstance(reply, SessionDeleted):
        raise ApiError(500, "Unexpected reply from the session actor.", code="actor_failed")
    return _json({"id": reply.session_id, "object": "session.deleted", "deleted": True})


async def health(request: web.Request) -> web.Response:
    nc = request.app[NATS]
    ok = nc.is_connected
    return _json({"status": "ok" if ok else "degraded", "nats": ok}, 200 if ok else 503)


def create_app(config: Config, nats_url: str) -> web.Application:
    """The gateway application; its NATS connection lives and drains with it."""
    server = config.server
    guard = ConnectionGuard(
        max_connections=server.max_connections,
        max_per_client=server.max_connections_per_client,
        header_timeout=server.header_timeout,
        keepalive_timeout=server.keepalive_timeout,
    )
    app = web.Application(
        client_max_size=server.max_body_bytes,
        middlewares=[guard_middleware(guard), errors_middleware, auth_middleware],
    )
    app[CONFIG] = config
    app[AUTH] = Authenticator(config)
    app[GUARD] = guard

    async def nats_connection(app: web.Application) -> AsyncIterator[None]:
        app[NATS] = await connect(nats_url, name="veil-gateway")
        yield
        await app[NATS].drain()

    app.cleanup_ctx.append(nats_connection)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/v1/sessions/{session_id}", get_session)
    app.router.add_delete("/v1/sessions/{session_id}", delete_session)
    app.router.add_get("/v1/sessions/{session_id}/messages", list_messages)
    app.router.add_get("/v1/sessions/{session_id}/memories", search_memories)
    app.router.add_get("/healthz", health)
    add_admin_routes(app)
    return app
