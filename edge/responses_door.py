"""POST /v1/responses and GET/DELETE /v1/responses/{id}[/input_items]: OpenAI's Responses
API on Veil's sessions.

A response is one turn of a session, run as every door runs it (edge/chat.py); only the
request (edge/responses_wire.py) and the answer (edge/responses_answer.py,
edge/responses_sse.py) are this API's. Which session:

- `previous_response_id`: the session of that response, which must be its session's
  latest turn (else a 400 that names the latest: Veil's sessions are one line, not a
  tree; fork by resending the conversation you want without it);
- `conversation`: a session id (continued, or opened under that name);
- neither: a client that resends its whole conversation (`store: false` clients do)
  continues the session that holds it (edge/history_index.py); anything else opens a
  new session. X-Session-Id and metadata.session_id name one as on the chat door.

A response is read back from the session's log (GET: the turn's answer; input_items:
the messages the turn added). The log is append-only, so DELETE appends a
`response.deleted` event (through the session actor, between turns, as conversation
item edits: `decide` refuses it while a turn is open): the turn's messages leave the
history the model sees and the conversation's items, and the response reads back as a
free id (404; a 400 as `previous_response_id`).
Its words stay in the log until the session is deleted (DELETE /v1/sessions/{id}), as a
deleted conversation item's do; `store: false` does not keep a turn out of the log
either (the session is Veil's memory): delete the session to forget it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated

import msgspec
from aiohttp import web
from msgspec import Meta

from contracts.conversations import DeleteResponse
from contracts.session import SessionView, StartTurn, TurnDone, TurnError
from contracts.turns import GetTurns, TurnsFound, TurnTrace
from edge.auth import require_scope
from edge.chat import (
    SESSION_HEADER,
    TurnItem,
    check_model,
    command_id_for,
    read_body,
    run_chat_turn,
)
from edge.history_index import HISTORY, Conversation, recognise
from edge.listing import MAX_ITEMS_PAGE, list_limit, list_order
from edge.openai_wire import ApiError
from edge.openapi import IDEMPOTENCY_KEY, SESSION_ID_HEADER, Param, operation
from edge.relay import ask_session
from edge.responses_answer import (
    Settings,
    input_items,
    output_items,
    response_object,
    settings_of_request,
    traced_response,
)
from edge.responses_objects import (
    RESPONSE_EVENTS,
    InputItemList,
    ResponseDeletedObject,
    ResponseObject,
)
from edge.responses_sse import stream_response
from edge.responses_wire import (
    MAX_RESPONSE_ID,
    ResponseRef,
    ResponsesRequest,
    conversation_id,
    parse_response_id,
    parse_responses_request,
    response_id,
    to_chat_request,
)
from edge.webkeys import CONFIG, NATS, PRINCIPAL, json_response

__all__ = ["create_response", "delete_response", "get_response", "list_input_items"]

# Pages of later turns read to find a session's latest response (100 turns each).
MAX_PAGES = 10

RESPONSE_ID = Annotated[
    str,
    Meta(max_length=MAX_RESPONSE_ID, description="A response's id (`resp_...`)."),
]
_ON_RESPONSE = {"response_id": RESPONSE_ID}


class _ResponsesDoor:
    """The response object, or its events; a recognised conversation recorded first."""

    name = "responses"

    def __init__(
        self, request: web.Request, settings: Settings, conversation: Conversation | None
    ) -> None:
        self._request = request
        self._settings = settings
        self._conversation = conversation

    async def _ended(self, start: StartTurn, result: TurnDone | TurnError) -> None:
        if self._conversation is None:
            return
        index = self._request.app[HISTORY]
        if isinstance(result, TurnDone):
            await self._conversation.answered(index, start, result)
        else:
            await self._conversation.failed(index)

    async def complete(self, start: StartTurn, result: TurnDone | TurnError) -> web.Response:
        await self._ended(start, result)
        if isinstance(result, TurnError):
            raise ApiError.of(result.error)
        body = response_object(
            session_id=start.session_id,
            turn_id=start.turn_id,
            created_at=int(time.time()),
            model=start.model,
            settings=self._settings,
            status="completed",
            output=output_items(start.turn_id, result.content, result.tool_calls),
            usage=result.usage,
            finish_reason=result.finish_reason,
        )
        return json_response(body, headers={SESSION_HEADER: start.session_id})

    async def stream(
        self,
        request: web.Request,
        start: StartTurn,
        batches: AsyncIterator[list[TurnItem]],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        async def ended(result: TurnDone | TurnError) -> None:
            await self._ended(start, result)

        return await stream_response(request, start, self._settings, batches, headers, ended)


def _not_found(value: str) -> ApiError:
    return ApiError(
        404,
        f"No response found with id '{value[:MAX_RESPONSE_ID]}'.",
        param="response_id",
        code="response_not_found",
    )


async def _turns(request: web.Request, ref: ResponseRef, **query: object) -> TurnsFound:
    principal = request[PRINCIPAL]
    command = GetTurns(
        session_id=ref.session_id,
        tenant=principal.tenant,
        user=principal.user,
        **query,  # type: ignore[arg-type]
    )
    reply = await ask_session(request.app[NATS], command, request.app[CONFIG].server.accept_timeout)
    if not isinstance(reply, TurnsFound):
        raise ApiError(500, "Unexpected reply from the session actor.", code="actor_failed")
    return reply


async def _trace(request: web.Request, value: str) -> tuple[ResponseRef, TurnTrace]:
    """The turn a response id names, among the caller's sessions (else a 404, alike)."""
    ref = parse_response_id(value)
    if ref is None:
        raise _not_found(value)
    try:
        found = await _turns(request, ref, turn_id=ref.turn_id, content=True)
    except ApiError as error:
        if error.status == 404:
            raise _not_found(value) from None
        raise
    return ref, found.turns[0]


async def _continued(request: web.Request, previous: str) -> str:
    """The session a previous response continues, if it is its session's latest turn.

    Failed and cancelled turns after it do not count: they added nothing to the session's
    history (and their clients got an error, not a response id to continue from)."""
    ref = parse_response_id(previous)
    refused = ApiError(
        400,
        f"Previous response with id '{previous[:MAX_RESPONSE_ID]}' not found.",
        param="previous_response_id",
        code="previous_response_not_found",
    )
    if ref is None:
        raise refused
    after, latest = ref.turn_id, None
    for _ in range(MAX_PAGES):
        try:
            later = await _turns(request, ref, after=after, limit=MAX_ITEMS_PAGE)
        except ApiError as error:
            if error.status in (400, 404) and after == ref.turn_id:
                raise refused from None  # no such session, or no such turn in it
            raise
        kept = [t.turn_id for t in later.turns if t.status in ("completed", "running")]
        latest = kept[-1] if kept else latest
        if not later.has_more:
            break
        after = later.turns[-1].turn_id
    else:
        latest = latest or after  # a session this long: refuse rather than read on
    if latest is not None:
        raise ApiError(
            400,
            f"Response '{previous[:MAX_RESPONSE_ID]}' is not the latest of its conversation: "
            f"continue from {response_id(ref.session_id, latest)}. A session is one line of "
            "turns; to branch, resend the conversation you want (without "
            "previous_response_id).",
            param="previous_response_id",
            code="previous_response_not_latest",
        )
    return ref.session_id


@operation(
    "Create a response",
    description="OpenAI's Responses API, on a session: a response is one turn. Continue "
    "with `previous_response_id` (the latest response of its session) or `conversation` "
    "(a session id), or resend the whole conversation (recognised as its session). "
    "Function tools and their outputs; `store: false` is accepted, but every turn is in "
    "its session's log. With `stream: true`, the typed response.* events.",
    tags=("chat",),
    body=ResponsesRequest,
    body_examples={
        "a string": {"model": "veil", "input": "Hello"},
        "continued, streamed": {
            "model": "veil",
            "input": [{"role": "user", "content": "And then?"}],
            "previous_response_id": "resp_c2Vzc19hYmMuMTIz",
            "stream": True,
        },
    },
    ok=ResponseObject,
    sse=RESPONSE_EVENTS,
    sse_done=False,
    ok_headers=(SESSION_ID_HEADER,),
    headers=(SESSION_ID_HEADER, IDEMPOTENCY_KEY),
    errors=(400, 404, 408, 413, 415, 422, 502, 503, 504),
    rate_limited=True,
)
async def create_response(request: web.Request) -> web.StreamResponse:
    principal = request[PRINCIPAL]
    require_scope(principal, "chat")
    body = parse_responses_request(await read_body(request))
    conversation_named = conversation_id(body)
    chat = to_chat_request(body, conversation_named)
    check_model(request, body.model)
    command_id = command_id_for(request, principal)
    conversation: Conversation | None = None
    if body.previous_response_id is not None:
        session_id = await _continued(request, body.previous_response_id)
        chat = msgspec.structs.replace(chat, session_id=session_id)
    elif conversation_named is None:
        chat, conversation = await recognise(request, chat, command_id)
    door = _ResponsesDoor(request, settings_of_request(body, conversation_named), conversation)
    return await run_chat_turn(request, chat, door, command_id)


@operation(
    "Retrieve a response",
    description="A response as it was answered, from its session's log.",
    tags=("chat",),
    path=_ON_RESPONSE,
    ok=ResponseObject,
    errors=(404, 503, 504),
)
async def get_response(request: web.Request) -> web.Response:
    require_scope(request[PRINCIPAL], "chat", "audit")
    ref, trace = await _trace(request, request.match_info["response_id"])
    return json_response(traced_response(ref.session_id, trace))


@operation(
    "Delete a response",
    description="Takes the response's turn out of its session (a `response.deleted` "
    "event): its input and its answer leave the history the model sees and the "
    "conversation's items, and the id reads back as unknown (404). Decided between turns, "
    "as conversation item edits are (a 409 while a turn holds the session). The log keeps "
    "its words until the session is deleted (DELETE /v1/sessions/{id}).",
    tags=("chat",),
    path=_ON_RESPONSE,
    ok=ResponseDeletedObject,
    errors=(404, 409, 503, 504),
)
async def delete_response(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    require_scope(principal, "chat")
    value = request.match_info["response_id"]
    ref = parse_response_id(value)
    if ref is None:
        raise _not_found(value)
    command = DeleteResponse(
        session_id=ref.session_id,
        tenant=principal.tenant,
        key_id=principal.key_id,
        user=principal.user,
        turn_id=ref.turn_id,
    )
    config = request.app[CONFIG]
    try:
        reply = await ask_session(request.app[NATS], command, config.server.accept_timeout)
    except ApiError as error:
        if error.status == 404:
            raise _not_found(value) from None  # no such session, or no such response in it
        raise
    if not isinstance(reply, SessionView):
        raise ApiError(500, "Unexpected reply from the session actor.", code="actor_failed")
    return json_response(ResponseDeletedObject(id=value, object="response", deleted=True))


@operation(
    "List a response's input items",
    description="The messages the response's turn added to its session (what was resent "
    "and the session already held is not among them).",
    tags=("chat",),
    path=_ON_RESPONSE,
    query=(
        Param("after", str, "List the items after this one (the last page's last_id)."),
        Param("limit", Annotated[int, Meta(ge=1, le=MAX_ITEMS_PAGE)], "At most this many."),
        Param("order", str, "`asc` or `desc` (the default, newest first)."),
    ),
    ok=InputItemList,
    errors=(400, 404, 503, 504),
)
async def list_input_items(request: web.Request) -> web.Response:
    require_scope(request[PRINCIPAL], "chat", "audit")
    query = request.query
    order = list_order(query)
    limit = list_limit(query)
    ref, trace = await _trace(request, request.match_info["response_id"])
    messages = trace.content.messages if trace.content is not None else []
    items = input_items(ref.turn_id, messages)
    if order == "desc":
        items.reverse()
    after = query.get("after")
    if after is not None:
        ids = [i.id for i in items]
        if after not in ids:
            raise ApiError(400, "after must be an item id.", param="after", code="invalid_value")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return json_response(
        InputItemList(
            object="list",
            data=page,
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=len(items) > limit,
        )
    )
