"""What every gateway request leaves for operators: metrics, a span, and log context.

The middleware (outside the error middleware, so it sees the status the client gets)
names the request (a request id, on every log line of its work and sent on to the
session actor), opens its span (continuing the client's `traceparent`, when valid),
and counts it when it ends. The chat handler adds what only it knows: the public model,
the session and turn, and for a turn that ended its usage and finish reason.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from opentelemetry.trace import Span

from bus import telemetry
from contracts.session import StartTurn, TurnDone, TurnError
from edge.auth import Principal
from edge.metrics import METRICS

__all__ = ["chat_ended", "chat_started", "observe_middleware", "principal_known"]

log = structlog.get_logger("veil.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The public model a request used, once the handler knows it is a configured one.
MODEL = web.RequestKey("veil_model", str)
SPAN = web.RequestKey("veil_span", Span)
STARTED = web.RequestKey("veil_started", float)

# Request ids: unique per process start and cheap (no random draw per request).
_PREFIX = f"req_{secrets.token_hex(6)}"
_counter = itertools.count(1)
_bind = structlog.contextvars.bind_contextvars


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = request[STARTED] = time.perf_counter()
    route = _route(request)
    # Each request runs in a task of its own (aiohttp): the id stays with its work.
    telemetry.bind_request_id(f"{_PREFIX}_{next(_counter):x}")
    metrics = request.app[METRICS]
    metrics.in_flight.inc()
    status = 500
    try:
        if telemetry.enabled():
            response = await _traced(request, handler, route)
        else:
            response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as error:
        status = error.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client left and aiohttp cancelled the handler
        raise
    finally:
        seconds = time.perf_counter() - started
        metrics.in_flight.dec()
        model = request.get(MODEL, "")
        metrics.request(route, request.method, status, model, seconds)
        log.info(
            "http.request",
            method=request.method,
            route=route,
            status=status,
            model=model or None,
            ms=round(seconds * 1000, 3),
        )


async def _traced(request: web.Request, handler: Handler, route: str) -> web.StreamResponse:
    """The request inside its server span, continuing the client's trace if it sent one."""
    parent = telemetry.incoming(request.headers)
    name = f"{request.method} {route}"
    with telemetry.span(name, kind=telemetry.SpanKind.SERVER, parent=parent) as span:
        assert span is not None  # tracing is on
        request[SPAN] = span
        span.set_attributes(
            {
                "http.request.method": request.method,
                "http.route": route,
                "veil.request.id": telemetry.request_id() or "",
            }
        )
        response = await handler(request)
        status = response.status
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            telemetry.failed(span, str(status))
        return response


def principal_known(principal: Principal) -> None:
    """The caller is known: its tenant and key id go on every log line from here on."""
    _bind(tenant=principal.tenant, key_id=principal.key_id)


def chat_started(request: web.Request, start: StartTurn) -> None:
    """A chat request is about to run its turn: label, log and name it after it."""
    request[MODEL] = start.model
    _bind(session_id=start.session_id, turn_id=start.turn_id)
    span = request.get(SPAN)
    if span is not None:
        # The GenAI conventions' inference span, as this server's clients see it.
        span.update_name(f"chat {start.model}")
        span.set_attributes(
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "veil",
                "gen_ai.system": "veil",
                "gen_ai.request.model": start.model,
                "gen_ai.conversation.id": start.session_id,
                "gen_ai.request.stream": start.stream,
                "veil.turn.id": start.turn_id,
            }
        )


def chat_ended(
    request: web.Request, start: StartTurn, result: TurnDone | TurnError | None, first: float | None
) -> None:
    """A chat request's turn ended: its usage (counted), finish reason and first token.

    `first`: when (time.perf_counter) the turn's first output reached the gateway.
    """
    metrics = request.app[METRICS]
    if first is not None:
        metrics.first_token(start.model, first - request[STARTED])
    if isinstance(result, TurnDone):
        metrics.tokens(start.model, result.usage)
    span = request.get(SPAN)
    if span is None or result is None:
        return
    if isinstance(result, TurnDone):
        span.set_attributes(
            {
                "gen_ai.response.id": f"chatcmpl-{start.turn_id}",
                "gen_ai.response.model": start.model,
                "gen_ai.response.finish_reasons": [result.finish_reason],
                "gen_ai.usage.input_tokens": result.usage.prompt_tokens,
                "gen_ai.usage.output_tokens": result.usage.completion_tokens,
            }
        )
        if first is not None:
            span.set_attribute("gen_ai.response.time_to_first_chunk", first - request[STARTED])
    else:
        span.set_attribute("error.type", result.error.code or str(result.error.status))
