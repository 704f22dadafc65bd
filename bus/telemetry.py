"""What crosses the bus beside the payloads, for operators: trace context and request ids.

Traces: W3C trace context (`traceparent`, `tracestate`) travels in NATS message headers
from the gateway to the session actor and on to the actors it asks, so one client
request is one trace across processes. Spans are made only once `install` was given a
tracer provider (veil/telemetry.py does so when `OTEL_EXPORTER_OTLP_ENDPOINT` is set);
until then `span()` hands back one shared null context and `outgoing()` adds no trace
header, so tracing that is off costs a function call and a comparison, not the
OpenTelemetry API's no-op objects.

Request ids: the gateway names each HTTP request; the id rides along in a header of its
own, is kept in a context variable while the request (or the turn it started) is served,
and is bound to the log lines of that work.

Headers from outside are untrusted: a traceparent or a request id that is too long or
malformed is ignored (a new trace, no id), never an error.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import (
    Span,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    TracerProvider,
    get_current_span,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "REQUEST_ID_HEADER",
    "SpanKind",
    "bind_request_id",
    "current_span",
    "enabled",
    "failed",
    "incoming",
    "install",
    "outgoing",
    "provider",
    "request_id",
    "serving",
    "span",
]

REQUEST_ID_HEADER = "Veil-Request-Id"
# A traceparent is 55 characters (version 00); later versions may append fields. W3C
# asks to pass on at least 512 characters of tracestate; past that it is dropped.
MAX_TRACEPARENT = 128
MAX_TRACESTATE = 512
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

_PROPAGATOR = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
_tracer: Tracer | None = None
_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()
_request_id: ContextVar[str | None] = ContextVar("veil_request_id", default=None)


def install(provider: TracerProvider | None) -> None:
    """Make spans with this provider from now on (None: tracing off)."""
    global _provider, _tracer
    _provider = provider
    _tracer = None if provider is None else provider.get_tracer("veil")


def enabled() -> bool:
    return _tracer is not None


def provider() -> TracerProvider | None:
    """The provider spans are made with (None: tracing is off)."""
    return _provider


def span(
    name: str, *, kind: SpanKind = SpanKind.INTERNAL, parent: Context | None = None
) -> contextlib.AbstractContextManager[Span | None]:
    """A span, current while the block runs (the block gets None when tracing is off).

    Its parent is `parent` when given (a context from `incoming`), else the current span.
    An exception that leaves the block is recorded on it and sets its status to error.
    """
    if _tracer is None:
        return _OFF
    return _tracer.start_as_current_span(name, context=parent, kind=kind)


def current_span() -> Span | None:
    """The span being recorded here, to add what is learnt on the way (None: tracing is off,
    or this trace is not sampled)."""
    if _tracer is None:
        return None
    current = get_current_span()
    return current if current.is_recording() else None


def failed(span: Span, error_type: str) -> None:
    """Mark `span` as ended in an error of this kind (a code, a status, an exception's name)."""
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR))


def outgoing(headers: dict[str, str] | None = None) -> dict[str, str] | None:
    """`headers` plus the current trace context and request id, for a request on the bus;
    `headers` as they are when there is neither."""
    rid = _request_id.get()
    if _tracer is None and rid is None:
        return headers
    carrier = dict(headers) if headers else {}
    if rid is not None:
        carrier[REQUEST_ID_HEADER] = rid
    if _tracer is not None:
        _PROPAGATOR.inject(carrier)
    return carrier or None


def incoming(headers: Mapping[str, str] | None) -> Context | None:
    """The trace context that `headers` carry (NATS or HTTP), or None: tracing is off, or
    there is none, or it is malformed (the span made under it then starts a new trace)."""
    if _tracer is None or not headers:
        return None
    parent = headers.get("traceparent")
    if parent is None or len(parent) > MAX_TRACEPARENT:
        return None
    carrier = {"traceparent": parent}
    state = headers.get("tracestate")
    if state is not None and len(state) <= MAX_TRACESTATE:
        carrier["tracestate"] = state
    try:
        return _PROPAGATOR.extract(carrier)
    except Exception:  # noqa: BLE001 - a client's header never fails its request
        return None


def request_id(headers: Mapping[str, str] | None = None) -> str | None:
    """The request id in `headers` if valid, else the current one (None outside a request)."""
    if headers:
        given = headers.get(REQUEST_ID_HEADER)
        if given is not None and _REQUEST_ID.fullmatch(given):
            return given
    return _request_id.get()


def bind_request_id(request_id: str) -> None:
    """The current task serves this request from now on (a task of its own: nothing resets it)."""
    _request_id.set(request_id)


@contextlib.contextmanager
def serving(request_id: str | None, trace: Context | None = None) -> Iterator[None]:
    """While the block runs: this request id goes out with what it asks of the bus, and
    `trace` (from `incoming`) is the parent of the spans it makes."""
    rid = _request_id.set(request_id)
    attached: Any = otel_context.attach(trace) if trace is not None else None
    try:
        yield
    finally:
        if attached is not None:
            otel_context.detach(attached)
        _request_id.reset(rid)
