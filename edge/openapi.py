"""`GET /openapi.json`: the API described as OpenAPI 3.1, made from the app's own parts.

Every schema comes from a type: the request Structs the gateway decodes with
(edge/openai_wire.py, the admin handlers' own) and the response Structs it encodes
through (edge/responses.py), by `msgspec.json.schema_components`. What a handler adds,
its summary, parameters and the errors it can answer, is declared next to it:

    @operation(
        "List a session's turns",
        tags=("sessions",),
        ok=TurnList,
        path={"session_id": SESSION_ID},
        query=(Param("limit", Annotated[int, Meta(ge=1, le=100)], "Turns per page."),),
        errors=(400, 404, 503),
    )
    async def list_turns(request: web.Request) -> web.Response: ...

The document lists the routes the app has (walked from `app.router`), each with the
declaration found on its handler. A route without one is logged and left out, and
tests/test_openapi.py fails on it: an endpoint is described when it is added.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import msgspec
import structlog
from aiohttp import web

from bus.codec import encode
from bus.subjects import MAX_ID_LENGTH
from edge.responses import ErrorBody

__all__ = [
    "ERROR_TEXT",
    "IDEMPOTENCY_KEY",
    "OPENAPI_VERSION",
    "RATE_LIMIT_HEADERS",
    "SESSION_ID",
    "SESSION_ID_HEADER",
    "Operation",
    "Param",
    "build_document",
    "described",
    "openapi_json",
    "operation",
]

log = structlog.get_logger("veil.gateway")

OPENAPI_VERSION = "3.1.0"
_ATTRIBUTE = "__veil_operation__"
_REF = "#/components/schemas/{name}"
_PATH_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")

H = TypeVar("H", bound=Callable[..., Any])

# A session id as a path parameter (anything else is a 404, like an unknown session).
SESSION_ID = Annotated[
    str,
    msgspec.Meta(
        pattern=f"^[A-Za-z0-9_-]{{1,{MAX_ID_LENGTH}}}$",
        description="A session id (1-128 characters from A-Za-z0-9_-).",
        examples=["sess_8d0f6b4e2c"],
    ),
]

# Error statuses, as the gateway means them; each operation lists those it can answer.
ERROR_TEXT: dict[int, str] = {
    400: "The request is invalid: not JSON, a wrong type, a value out of range, or a "
    "parameter the model's engine cannot honour. `error.param` names the field.",
    401: "No API key or bearer token, or one that is unknown, revoked or expired.",
    403: "The key lacks the scope this needs, names another user than the one it is "
    "pinned to, or (with authentication off) the request came from a web page.",
    404: "Not found, or not visible to this key: another tenant's session, a model the "
    "key may not use, and one that does not exist answer alike (a chat turn naming a "
    "session its tenant has none of opens it; a deleted one stays deleted).",
    408: "The request body did not arrive in time.",
    413: "The request body is larger than the server accepts.",
    415: "The body is not sent as application/json.",
    409: "A turn of the conversation is running: add or delete its items once it ends.",
    422: "The Idempotency-Key was used before for a different request.",
    429: "A rate limit or budget of the key or its tenant is spent: retry after "
    "`Retry-After` seconds.",
    502: "The upstream model failed, or the turn's output broke off.",
    503: "A part of Veil (the message bus, a worker, the knowledge base) or an upstream "
    "model is unavailable, or the worker is at its bound of queued turns "
    "(`server_is_overloaded`, with `Retry-After`); try again shortly.",
    504: "The turn, or the session it waited for, did not finish in time.",
}

# OpenAI's rate limit headers (with the limits of the key's quota); each may be absent
# when no such limit applies.
RATE_LIMIT_HEADERS: dict[str, tuple[str, dict[str, Any]]] = {
    "x-ratelimit-limit-requests": (
        "Requests allowed per minute.",
        {"type": "integer", "minimum": 0},
    ),
    "x-ratelimit-remaining-requests": (
        "Requests left in the current window.",
        {"type": "integer", "minimum": 0},
    ),
    "x-ratelimit-reset-requests": (
        "Time until the request limit is whole again, as OpenAI writes it (`1s`, `6m0s`).",
        {"type": "string", "examples": ["1s", "6m0s", "20ms"]},
    ),
    "x-ratelimit-limit-tokens": (
        "Tokens allowed per minute.",
        {"type": "integer", "minimum": 0},
    ),
    "x-ratelimit-remaining-tokens": (
        "Tokens left in the current window.",
        {"type": "integer", "minimum": 0},
    ),
    "x-ratelimit-reset-tokens": (
        "Time until the token limit is whole again (`1s`, `6m0s`).",
        {"type": "string", "examples": ["1s", "6m0s", "20ms"]},
    ),
}


@dataclass(frozen=True, slots=True)
class Param:
    """A query, header or path parameter; `type` is any type msgspec can describe."""

    name: str
    type: Any = str
    description: str = ""
    required: bool = False


SESSION_ID_HEADER = Param(
    "X-Session-Id",
    Annotated[str, msgspec.Meta(pattern=f"^[A-Za-z0-9_-]{{0,{MAX_ID_LENGTH}}}$")],
    "The session to continue (or to open under this name), as the body's `session_id`. "
    "The response carries the session in the same header.",
)
IDEMPOTENCY_KEY = Param(
    "Idempotency-Key",
    str,
    "A retry under the same key gets the first answer instead of a second turn; the "
    "key reused for another request is a 422.",
)


@dataclass(frozen=True, slots=True)
class Operation:
    """What a handler declares about itself (see the module's doc)."""

    summary: str
    description: str = ""
    tags: tuple[str, ...] = ()
    # The JSON request body's type, or a raw schema for another media type.
    body: Any = None
    body_media: str = "application/json"
    body_schema: Mapping[str, Any] | None = None
    body_examples: Mapping[str, Any] = field(default_factory=dict)
    # The success answer: its status, JSON body type, the types of the data of its
    # server-sent events when it may stream, and other media types it may take
    # (media type -> what it is).
    ok: Any = None
    ok_status: int = 200
    ok_description: str = "OK"
    sse: tuple[Any, ...] = ()
    # Whether the stream ends with `data: [DONE]` (OpenAI's) or not (Anthropic's, whose
    # events are named by `event:`).
    sse_done: bool = True
    ok_media: Mapping[str, str] = field(default_factory=dict)
    ok_headers: tuple[Param, ...] = ()
    # Answers besides the success and the errors (status -> (description, JSON type)).
    also: Mapping[int, tuple[str, Any]] = field(default_factory=dict)
    path: Mapping[str, Any] = field(default_factory=dict)
    query: tuple[Param, ...] = ()
    headers: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    # Needs `Authorization: Bearer` (when the server has keys): 401 and 403 may answer.
    auth: bool = True
    # Goes through the key's and tenant's rate limits and budgets: 429 may answer, and the
    # answers carry the x-ratelimit-* headers.
    rate_limited: bool = False
    # The body of its errors, when not OpenAI's ErrorBody (the Anthropic door's).
    error_body: Any = None

    def __post_init__(self) -> None:
        unknown = set(self.errors) - set(ERROR_TEXT)
        if unknown:
            raise ValueError(f"say what {sorted(unknown)} mean in ERROR_TEXT (edge/openapi.py)")

    def __call__(self, handler: H) -> H:
        """Mark `handler` with this declaration (it stays the same function)."""
        setattr(handler, _ATTRIBUTE, self)
        return handler


# The decorator: `@operation("Summary", tags=..., ok=...)`, type-checked field by field.
operation = Operation


def described(handler: Callable[..., Any]) -> Operation | None:
    found = getattr(handler, _ATTRIBUTE, None)
    return found if isinstance(found, Operation) else None


def _version() -> str:
    try:
        return importlib.metadata.version("veil")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _routes(app: web.Application) -> Iterable[tuple[str, str, Callable[..., Any]]]:
    """(method, path template, handler) of each route, without the HEADs aiohttp adds."""
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        yield route.method, route.resource.canonical, route.handler


class _Schemas:
    """Collects the types the document names, then has msgspec describe them all at once."""

    def __init__(self) -> None:
        self._types: list[Any] = []
        self._slots: list[tuple[Any, str | int]] = []

    def put(self, type_: Any, into: dict[str, Any] | list[Any], key: str | int = "schema") -> None:
        """`into[key]` becomes `type_`'s schema once `components()` has run."""
        self._types.append(type_)
        self._slots.append((into, key))

    def components(self) -> dict[str, Any]:
        schemas, components = msgspec.json.schema_components(self._types, ref_template=_REF)
        for (into, key), schema in zip(self._slots, schemas, strict=True):
            into[key] = schema
        return dict(sorted(components.items()))


def _param(where: str, param: Param, schemas: _Schemas) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": param.name, "in": where, "required": param.required}
    if param.description:
        entry["description"] = param.description
    schemas.put(param.type, entry)
    return entry


def _header(description: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"description": description, "schema": dict(schema)}


def _components_headers() -> dict[str, Any]:
    headers = {name: _header(*spec) for name, spec in RATE_LIMIT_HEADERS.items()}
    headers["Retry-After"] = _header(
        "Seconds to wait before retrying.", {"type": "integer", "minimum": 0}
    )
    return headers


def _rate_limit_refs() -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in RATE_LIMIT_HEADERS}


def _error_responses() -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, text in ERROR_TEXT.items():
        response: dict[str, Any] = {
            "description": text,
            "content": {"application/json": {"schema": {"$ref": _REF.format(name="ErrorBody")}}},
        }
        if status == 429:
            response["headers"] = {
                "Retry-After": {"$ref": "#/components/headers/Retry-After"},
                **_rate_limit_refs(),
            }
        elif status == 503:
            response["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
        responses[str(status)] = response
    return responses


def _operation(
    path: str, handler: Callable[..., Any], op: Operation, schemas: _Schemas
) -> dict[str, Any]:
    entry: dict[str, Any] = {"operationId": handler.__name__, "summary": op.summary}
    if op.description:
        entry["description"] = op.description
    if op.tags:
        entry["tags"] = list(op.tags)
    parameters = [
        _param("path", Param(name, op.path.get(name, str), required=True), schemas)
        for name in _PATH_PARAM.findall(path)
    ]
    parameters += [_param("query", p, schemas) for p in op.query]
    parameters += [_param("header", p, schemas) for p in op.headers]
    if parameters:
        entry["parameters"] = parameters
    if op.body is not None or op.body_schema is not None:
        media: dict[str, Any] = {}
        if op.body_schema is not None:
            media["schema"] = dict(op.body_schema)
        else:
            schemas.put(op.body, media)
        if op.body_examples:
            media["examples"] = {k: {"value": v} for k, v in op.body_examples.items()}
        entry["requestBody"] = {"required": True, "content": {op.body_media: media}}
    entry["responses"] = _responses(op, schemas)
    if not op.auth:
        entry["security"] = []
    return entry


def _responses(op: Operation, schemas: _Schemas) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": op.ok_description}
    content: dict[str, Any] = {}
    if op.ok is not None:
        json_media: dict[str, Any] = {}
        schemas.put(op.ok, json_media)
        content["application/json"] = json_media
    if op.sse:
        content["text/event-stream"] = _event_stream(op.sse, schemas, op.sse_done)
    for media_type, text in op.ok_media.items():
        content[media_type] = {"schema": {"type": "string", "description": text}}
    if content:
        ok["content"] = content
    headers = {p.name: _param_header(p, schemas) for p in op.ok_headers}
    if op.rate_limited:
        headers.update(_rate_limit_refs())
    if headers:
        ok["headers"] = headers
    responses: dict[str, Any] = {str(op.ok_status): ok}
    for status, (text, type_) in op.also.items():
        other: dict[str, Any] = {}
        schemas.put(type_, other)
        responses[str(status)] = {"description": text, "content": {"application/json": other}}
    codes = set(op.errors) - set(op.also)
    if op.auth:
        codes |= {401, 403}
    if op.rate_limited:
        codes.add(429)
    for status in sorted(codes):
        if op.error_body is None:
            responses[str(status)] = {"$ref": f"#/components/responses/{status}"}
        else:
            responses[str(status)] = _error_response(status, op.error_body, schemas)
    return responses


def _error_response(status: int, body: Any, schemas: _Schemas) -> dict[str, Any]:
    """An error answer with a body of its own type (the shared ones are OpenAI's)."""
    media: dict[str, Any] = {}
    schemas.put(body, media)
    response: dict[str, Any] = {
        "description": ERROR_TEXT[status],
        "content": {"application/json": media},
    }
    if status == 429:
        response["headers"] = {
            "Retry-After": {"$ref": "#/components/headers/Retry-After"},
            **_rate_limit_refs(),
        }
    return response


def _event_stream(types: tuple[Any, ...], schemas: _Schemas, done: bool = True) -> dict[str, Any]:
    """Server-sent events whose `data` is JSON of one of `types`, the last `[DONE]` if
    `done`.

    OpenAPI 3.1 has no word for one event of a stream (3.2's `itemSchema`); its tools
    (schemathesis among them) read a text/event-stream `schema` as that of each event, an
    object with the event's fields, as here."""
    data: dict[str, Any] = {"anyOf": [{} for _ in types]}
    for i, type_ in enumerate(types):
        schemas.put(type_, data["anyOf"], i)
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": data}
    if done:
        text = "`data:` a JSON chunk (or the error that ended the stream); the last event's "
        text += "data is `[DONE]`."
        data_schema: dict[str, Any] = {"anyOf": [json_data, {"const": "[DONE]"}]}
    else:
        text = "`event:` its type, `data:` the event as JSON (`error` when the stream fails)."
        data_schema = json_data
    return {
        "schema": {
            "description": f"One server-sent event: {text}",
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": data_schema,
                "event": {"type": "string"},
                "id": {"type": "string"},
                "retry": {"type": "integer"},
            },
        }
    }


def _param_header(param: Param, schemas: _Schemas) -> dict[str, Any]:
    header: dict[str, Any] = {"description": param.description}
    schemas.put(param.type, header)
    return header


def build_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app`'s routes (undescribed ones are logged, left out)."""
    schemas = _Schemas()
    schemas.put(ErrorBody, {})  # every error's body, referenced by name
    paths: dict[str, dict[str, Any]] = {}
    for method, path, handler in _routes(app):
        op = described(handler)
        if op is None:
            log.warning("openapi.undescribed_route", method=method, path=path)
            continue
        paths.setdefault(path, {})[method.lower()] = _operation(path, handler, op, schemas)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Veil",
            "version": _version(),
            "summary": "An OpenAI-compatible chat server with memory and an audit trail.",
            "description": "A plain OpenAI chat model from the outside; behind it, each "
            "session's conversation is an append-only event log. Send a session's id back "
            "(the `session_id` field, the `X-Session-Id` header or `metadata.session_id`) "
            "to continue it.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "security": [{"bearerAuth": []}],
        "tags": [{"name": t} for t in _tags(paths)],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas.components(),
            "responses": _error_responses(),
            "headers": _components_headers(),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (`[[keys]]`, VEIL_API_KEYS, `veil keys "
                    "create`) or a JWT of the configured issuer. A server with neither "
                    "serves loopback only, without authentication.",
                }
            },
        },
    }


# The order the groups of operations are shown in; others follow, by name.
_TAG_ORDER = ("chat", "models", "sessions", "usage", "knowledge", "keys", "meta")


def _tags(paths: Mapping[str, Mapping[str, Any]]) -> list[str]:
    used = {tag for item in paths.values() for op in item.values() for tag in op.get("tags", ())}
    return [t for t in _TAG_ORDER if t in used] + sorted(used - set(_TAG_ORDER))


class _Cached:
    """The document, encoded once: routes do not change while the app runs."""

    def __init__(self) -> None:
        self.body: bytes | None = None


_CACHE = web.AppKey("openapi", _Cached)


def install(app: web.Application) -> None:
    app[_CACHE] = _Cached()


@operation(
    "This document",
    description="The API as OpenAPI 3.1, generated from the types the gateway decodes "
    "requests with and encodes answers through. No key needed.",
    tags=("meta",),
    ok=dict[str, Any],
    ok_description="An OpenAPI 3.1 document.",
    auth=False,
)
async def openapi_json(request: web.Request) -> web.Response:
    cached = request.app[_CACHE]
    if cached.body is None:
        cached.body = encode(build_document(request.app))
    return web.Response(body=cached.body, content_type="application/json")
