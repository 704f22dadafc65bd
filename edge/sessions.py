"""/v1/sessions/{id}: a session's metadata, messages, turn traces, memory search, deletion."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web
from msgspec import Meta

from bus.subjects import MAX_ID_LENGTH, is_valid_id
from contracts.session import (
    DeleteSession,
    GetSession,
    MemoriesFound,
    SearchMemories,
    SessionDeleted,
    SessionView,
)
from contracts.turns import MAX_TURNS_PAGE, GetTurns, TurnsFound, TurnTrace
from edge.auth import require_scope
from edge.openai_wire import ApiError
from edge.openapi import SESSION_ID, Param, operation
from edge.relay import ask_session
from edge.responses import (
    CompletionUsage,
    MemoryList,
    MessageList,
    SessionDeletedObject,
    SessionMemory,
    SessionMessage,
    SessionObject,
    SessionTurn,
    TurnList,
)
from edge.webkeys import CONFIG, NATS, PRINCIPAL, json_response

__all__ = [
    "delete_session",
    "get_session",
    "get_turn",
    "list_messages",
    "list_turns",
    "search_memories",
]


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


def _session_object(view: SessionView) -> SessionObject:
    return SessionObject(
        id=view.session_id,
        object="session",
        created_at=int(view.created_at.timestamp()),
        updated_at=int(view.updated_at.timestamp()),
        model=view.model,
        turns=view.turns,
        usage=CompletionUsage(
            prompt_tokens=view.usage.prompt_tokens,
            completion_tokens=view.usage.completion_tokens,
            total_tokens=view.usage.total_tokens,
        ),
        state_digest=view.state_digest,
    )


async def _view(request: web.Request, messages: bool, digest: bool = False) -> SessionView:
    principal = request[PRINCIPAL]
    require_scope(principal, "chat", "audit")
    command = GetSession(
        session_id=_session_id_param(request),
        tenant=principal.tenant,
        user=principal.user,
        messages=messages,
        digest=digest,
    )
    reply = await ask_session(request.app[NATS], command, request.app[CONFIG].server.accept_timeout)
    if not isinstance(reply, SessionView):
        raise ApiError(500, "Unexpected reply from the session actor.", code="actor_failed")
    return reply


_ON_SESSION = {"session_id": SESSION_ID}
# A session read: another tenant's session is a 404 like one that does not exist; the
# session actor may be unreachable (503) or late (504).
_READ_ERRORS = (404, 503, 504)
TURN_ID = Annotated[
    str,
    Meta(
        pattern=f"^[A-Za-z0-9_-]{{1,{MAX_ID_LENGTH}}}$",
        description="A turn's id: the completion's id without `chatcmpl-`.",
    ),
]


@operation(
    "Retrieve a session",
    description="Created, updated, turns, usage and model of one of the caller's sessions; "
    "for audit and admin keys also `state_digest`, the digest of the state the session's "
    "actor holds, which `veil replay --digest` rebuilds from the log alone.",
    tags=("sessions",),
    path=_ON_SESSION,
    ok=SessionObject,
    errors=_READ_ERRORS,
)
async def get_session(request: web.Request) -> web.Response:
    auditor = bool(request[PRINCIPAL].scopes & {"audit", "admin"})
    return json_response(_session_object(await _view(request, messages=False, digest=auditor)))


@operation(
    "List a session's messages",
    description="The conversation as the model sees it.",
    tags=("sessions",),
    path=_ON_SESSION,
    ok=MessageList,
    errors=_READ_ERRORS,
)
async def list_messages(request: web.Request) -> web.Response:
    view = await _view(request, messages=True)
    data = [
        SessionMessage(id=f"msg_{i}", object="session.message", role=m.role, content=m.content)
        for i, m in enumerate(view.messages or [])
    ]
    return json_response(
        MessageList(
            object="list",
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=False,
        )
    )


@operation(
    "Search a session's memories",
    description="The long-term memory this session can see, by vector similarity and BM25 "
    "fused by rank.",
    tags=("sessions",),
    path=_ON_SESSION,
    query=(
        Param(
            "q",
            Annotated[str, Meta(pattern=r"\S", max_length=4096)],
            "The search text.",
            required=True,
        ),
        Param("limit", Annotated[int, Meta(ge=1, le=100)], "How many memories, at most."),
    ),
    ok=MemoryList,
    errors=(400, *_READ_ERRORS),
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
    require_scope(request[PRINCIPAL], "chat", "audit")
    command = SearchMemories(
        session_id=_session_id_param(request),
        tenant=request[PRINCIPAL].tenant,
        user=request[PRINCIPAL].user,
        query=query,
        k=limit,
    )
    reply = await ask_session(request.app[NATS], command, request.app[CONFIG].server.accept_timeout)
    if not isinstance(reply, MemoriesFound):
        raise ApiError(500, "Unexpected reply from the session actor.", code="actor_failed")
    data = [
        SessionMemory(
            id=h.id,
            object="session.memory",
            session_id=h.session_id,
            role=h.role,
            kind=h.kind,
            content=h.text,
            score=h.score,
            vector_similarity=h.vector_similarity,
            bm25=h.bm25,
            created_at=int(h.created_at.timestamp()),
        )
        for h in reply.hits
    ]
    return json_response(MemoryList(object="list", data=data, has_more=False))


@operation(
    "Delete a session",
    description="Forget the session everywhere: its events are erased from the log and its "
    "memories from the index; a tombstone remains.",
    tags=("sessions",),
    path=_ON_SESSION,
    ok=SessionDeletedObject,
    errors=_READ_ERRORS,
)
async def delete_session(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    require_scope(principal, "chat")
    command = DeleteSession(
        session_id=_session_id_param(request),
        tenant=principal.tenant,
        key_id=principal.key_id,
        user=principal.user,
    )
    reply = await ask_session(request.app[NATS], command, request.app[CONFIG].server.accept_timeout)
    if not isinstance(reply, SessionDeleted):
        raise ApiError(500, "Unexpected reply from the session actor.", code="actor_failed")
    return json_response(
        SessionDeletedObject(id=reply.session_id, object="session.deleted", deleted=True)
    )


def _turn_object(trace: TurnTrace) -> dict[str, Any]:
    body: dict[str, Any] = msgspec.to_builtins(trace)
    body.pop("turn_id")
    body["started_at"] = int(trace.started_at.timestamp())
    body["door"] = trace.door  # always said, the default door too
    if trace.ended_at is not None:
        body["ended_at"] = int(trace.ended_at.timestamp())
    return {"id": trace.turn_id, "object": "session.turn", **body}


async def _turns(request: web.Request, **query: Any) -> TurnsFound:
    principal = request[PRINCIPAL]
    require_scope(principal, "chat", "audit")
    command = GetTurns(
        session_id=_session_id_param(request),
        tenant=principal.tenant,
        user=principal.user,
        details=principal.admin,
        **query,
    )
    reply = await ask_session(request.app[NATS], command, request.app[CONFIG].server.accept_timeout)
    if not isinstance(reply, TurnsFound):
        raise ApiError(500, "Unexpected reply from the session actor.", code="actor_failed")
    return reply


@operation(
    "List a session's turns",
    description="Per turn, what happened behind the curtain: the pipeline and why, "
    "memories and documents recalled with their scores, tools run, every model call, how "
    "it ended; oldest first. A failed call's cause only for admin keys.",
    tags=("sessions",),
    path=_ON_SESSION,
    query=(
        Param("limit", Annotated[int, Meta(ge=1, le=MAX_TURNS_PAGE)], "Turns per page (20)."),
        Param("after", TURN_ID, "List the turns after this one (the last page's last_id)."),
    ),
    ok=TurnList,
    errors=(400, *_READ_ERRORS),
)
async def list_turns(request: web.Request) -> web.Response:
    """What happened behind the curtain, turn by turn (oldest first; `after`/`limit` page)."""
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        raise ApiError(
            400, "limit must be an integer.", param="limit", code="invalid_value"
        ) from None
    if not 1 <= limit <= MAX_TURNS_PAGE:
        raise ApiError(
            400,
            f"limit must be between 1 and {MAX_TURNS_PAGE}.",
            param="limit",
            code="invalid_value",
        )
    after = request.query.get("after")
    if after is not None and not is_valid_id(after):
        raise ApiError(400, "after must be a turn id.", param="after", code="invalid_value")
    found = await _turns(request, after=after, limit=limit)
    data = [_turn_object(t) for t in found.turns]
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": found.has_more,
        }
    )


@operation(
    "Retrieve a turn",
    tags=("sessions",),
    path={**_ON_SESSION, "turn_id": TURN_ID},
    ok=SessionTurn,
    errors=_READ_ERRORS,
)
async def get_turn(request: web.Request) -> web.Response:
    turn_id = request.match_info["turn_id"]
    if not is_valid_id(turn_id):
        raise ApiError(
            404,
            f"No turn found with id '{turn_id[:MAX_ID_LENGTH]}' in this session.",
            code="turn_not_found",
        )
    found = await _turns(request, turn_id=turn_id)
    return json_response(_turn_object(found.turns[0]))
