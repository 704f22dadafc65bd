"""The gateway's aiohttp application: middleware, routes, and its NATS connection.

The gateway holds no conversation state and never calls a model. It checks
the request, sends a command to the session's actor and turns what comes back
into an OpenAI response or SSE stream (or Anthropic's, on /v1/messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from bus.connection import connect
from config import Config
from contracts.keys import KeyRecord
from edge.admin import add_admin_routes
from edge.admission import add_limits
from edge.anthropic_errors import anthropic_error, speaks_anthropic
from edge.auth import Authenticator
from edge.chat import chat_completions
from edge.conversations import add_conversation_routes
from edge.cross_site import refuse_cross_site
from edge.docs_page import add_doc_routes
from edge.draining import add_draining
from edge.history_index import add_history_index
from edge.http_guard import ConnectionGuard, guard_middleware
from edge.keys_admin import add_key_routes
from edge.keystore import KeyStore
from edge.messages import count_message_tokens, create_message
from edge.metrics import METRICS, GatewayMetrics, metrics_page
from edge.models import get_model, list_models
from edge.observe import observe_middleware, principal_known
from edge.openai_wire import ApiError, error_body
from edge.openapi import operation
from edge.responses import Health
from edge.responses_door import (
    create_response,
    delete_response,
    get_response,
    list_input_items,
)
from edge.sessions import (
    delete_session,
    get_session,
    get_turn,
    list_messages,
    list_turns,
    search_memories,
)
from edge.usage import get_usage
from edge.webkeys import AUTH, CONFIG, GUARD, KEYSTORE, NATS, PRINCIPAL, json_response

__all__ = ["create_app"]

log = structlog.get_logger("veil.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(
    request: web.Request,
    status: int,
    message: str,
    type: str,
    code: str | None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error in the shape of the request's door: OpenAI's, or Anthropic's."""
    if speaks_anthropic(request.path):
        return json_response(anthropic_error(status, message), status, headers)
    return json_response(error_body(message, type, code, param), status, headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as an error in its door's shape; a client mistake is never a 500."""
    try:
        return await handler(request)
    except ApiError as error:
        headers = None
        if error.retry_after is not None:
            # Whole seconds (RFC 9110's delay-seconds), never 0: "now" invites a stampede.
            headers = {"Retry-After": str(max(1, math.ceil(error.retry_after)))}
        response = _error(
            request, error.status, error.message, error.type, error.code, error.param, headers
        )
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
        response = _error(
            request,
            413,
            f"Request body too large: {error.text}",
            "invalid_request_error",
            "request_too_large",
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
        return _error(request, error.status, message, "invalid_request_error", None, None, headers)
    except Exception:
        log.exception("gateway.unhandled", path=request.path)
        return _error(
            request, 500, "The server had an error processing your request.", "server_error", None
        )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/v1/"):
        auth = request.app[AUTH]
        if not auth.enabled:
            refuse_cross_site(request)
        header = request.headers.get("Authorization")
        if header is None and speaks_anthropic(request.path):
            # Anthropic's clients may send the key as x-api-key.
            key = request.headers.get("x-api-key")
            header = f"Bearer {key}" if key else None
        request[PRINCIPAL] = principal = await auth.resolve(header)
        principal_known(principal)
    return await handler(request)


# Seconds a gateway waits, at start, to read the key store.
KEYS_LOAD_TIMEOUT = 10.0


async def watch_keys(app: web.Application) -> AsyncIterator[None]:
    """Keep the authenticator in step with the key store; serve only once it has read it
    (else a key created earlier would be refused, or anonymous access let in)."""
    store = await KeyStore.open(app[NATS].jetstream())
    app[KEYSTORE] = store
    auth = app[AUTH]
    loaded = asyncio.Event()

    def apply(record: KeyRecord | None) -> None:
        if record is None:
            loaded.set()
        else:
            auth.apply(record)

    watching = asyncio.create_task(store.watch(apply), name="veil-keys-watch")
    try:
        async with asyncio.timeout(KEYS_LOAD_TIMEOUT):
            await loaded.wait()
    except TimeoutError:
        watching.cancel()
        raise RuntimeError("the key store did not answer: is JetStream enabled?") from None
    yield
    watching.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watching


@operation(
    "Health",
    description="Whether this gateway is connected to the message bus. No key needed.",
    tags=("meta",),
    ok=Health,
    also={503: ("Degraded: the gateway is not connected to the bus.", Health)},
    auth=False,
)
async def health(request: web.Request) -> web.Response:
    nc = request.app[NATS]
    ok = nc.is_connected
    return json_response({"status": "ok" if ok else "degraded", "nats": ok}, 200 if ok else 503)


def create_app(
    config: Config, nats_url: str, registry: CollectorRegistry | None = None
) -> web.Application:
    """The gateway application; its NATS connection lives and drains with it. Its metrics
    go to `registry` (the process's, shared with its workers), else to one of its own."""
    server = config.server
    guard = ConnectionGuard(
        max_connections=server.max_connections,
        max_per_client=server.max_connections_per_client,
        header_timeout=server.header_timeout,
        keepalive_timeout=server.keepalive_timeout,
    )
    app = web.Application(
        client_max_size=server.max_body_bytes,
        middlewares=[
            guard_middleware(guard),
            observe_middleware,
            errors_middleware,
            auth_middleware,
        ],
    )
    app[CONFIG] = config
    app[AUTH] = Authenticator(config)
    app[GUARD] = guard
    app[METRICS] = GatewayMetrics(registry or CollectorRegistry())

    async def nats_connection(app: web.Application) -> AsyncIterator[None]:
        app[NATS] = await connect(nats_url, name="veil-gateway")
        yield
        await app[NATS].drain()

    app.cleanup_ctx.append(nats_connection)
    app.cleanup_ctx.append(watch_keys)
    add_draining(app)
    add_limits(app)
    add_history_index(app)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/messages", create_message)
    app.router.add_post("/v1/messages/count_tokens", count_message_tokens)
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)
    app.router.add_get("/v1/responses/{response_id}/input_items", list_input_items)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/v1/sessions/{session_id}", get_session)
    app.router.add_delete("/v1/sessions/{session_id}", delete_session)
    app.router.add_get("/v1/sessions/{session_id}/messages", list_messages)
    app.router.add_get("/v1/sessions/{session_id}/memories", search_memories)
    app.router.add_get("/v1/sessions/{session_id}/turns", list_turns)
    app.router.add_get("/v1/sessions/{session_id}/turns/{turn_id}", get_turn)
    app.router.add_get("/v1/usage", get_usage)
    app.router.add_get("/healthz", health)
    app.router.add_get("/metrics", metrics_page)
    add_admin_routes(app)
    add_key_routes(app)
    add_conversation_routes(app)
    add_doc_routes(app)
    return app
