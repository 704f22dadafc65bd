"""/v1/conversations: OpenAI's Conversations API on Veil's sessions.

A conversation is a session (edge/conversations_wire.py): creating one opens a session
holding its items without calling a model, and the next /v1/responses turn with
`conversation` sees them. Deleting a conversation is DELETE /v1/sessions/{id}: forgotten
everywhere. The log is append-only, so deleting one item appends an `item.deleted`
event: the message leaves the history the model sees and the item lists, and its id is
never given out again; the words stay in the log until the session is deleted. Items
are added and deleted between turns (a 409 while a turn runs).

Every request is checked before anything is sent to the session: a refused one writes
nothing. Another tenant's conversation answers exactly as an id nobody uses (404).
"""

from __future__ import annotations

import uuid
from typing import Annotated

from aiohttp import web
from msgspec import Meta

from bus.subjects import MAX_ID_LENGTH, is_valid_id
from contracts.conversations import (
    AddItems,
    ConversationEdit,
    DeleteItem,
    OpenConversation,
    UpdateMetadata,
)
from contracts.session import DeleteSession, GetSession, SessionDeleted, SessionView
from edge.auth import require_scope
from edge.chat import read_body
from edge.conversations_wire import (
    ConversationCreate,
    ConversationDeletedObject,
    ConversationItemList,
    ConversationMessage,
    ConversationObject,
    ConversationUpdate,
    ItemsCreate,
    decode,
    item_number,
    message_object,
    to_messages,
)
from edge.listing import MAX_ITEMS_PAGE, list_limit, list_order
from edge.openai_wire import ApiError
from edge.openapi import SESSION_ID, Param, operation
from edge.relay import ask_session
from edge.webkeys import CONFIG, NATS, PRINCIPAL, json_response

__all__ = [
    "add_conversation_routes",
    "create_conversation",
    "create_items",
    "delete_conversation",
    "delete_item",
    "get_conversation",
    "get_item",
    "list_items",
    "update_conversation",
]

ITEM_ID = Annotated[str, Meta(pattern=r"^msg_[0-9]{1,9}$", description="An item id (`msg_N`).")]
_ON_CONVERSATION = {"conversation_id": SESSION_ID}
_ON_ITEM = {**_ON_CONVERSATION, "item_id": ITEM_ID}
_READ_ERRORS = (404, 503, 504)
_WRITE_ERRORS = (400, 404, 409, 413, 415, 503, 504)


def _conversation_id(request: web.Request) -> str:
    value = request.match_info["conversation_id"]
    if not is_valid_id(value):
        raise _not_found(value)
    return value


def _not_found(value: str) -> ApiError:
    return ApiError(
        404,
        f"No conversation found with id '{value[:MAX_ID_LENGTH]}'.",
        param="conversation_id",
        code="conversation_not_found",
    )


def _item_not_found(value: str) -> ApiError:
    return ApiError(
        404,
        f"No item found with id '{value[:MAX_ID_LENGTH]}' in this conversation.",
        param="item_id",
        code="item_not_found",
    )


async def _ask(request: web.Request, command: ConversationEdit | GetSession) -> SessionView:
    config = request.app[CONFIG]
    try:
        reply = await ask_session(request.app[NATS], command, config.server.accept_timeout)
    except ApiError as error:
        if error.status == 404 and error.code == "session_not_found":
            raise _not_found(command.session_id) from None
        raise
    if not isinstance(reply, SessionView):
        raise ApiError(500, "Unexpected reply from the session actor.", code="actor_failed")
    return reply


def _conversation(view: SessionView) -> ConversationObject:
    return ConversationObject(
        id=view.session_id,
        object="conversation",
        created_at=int(view.created_at.timestamp()),
        metadata=view.metadata,
    )


async def _items(request: web.Request) -> list[ConversationMessage]:
    """The conversation's items, oldest first."""
    principal = request[PRINCIPAL]
    require_scope(principal, "chat", "audit")
    command = GetSession(
        session_id=_conversation_id(request),
        tenant=principal.tenant,
        user=principal.user,
        messages=True,
    )
    view = await _ask(request, command)
    messages, numbers = view.messages or [], view.item_numbers or []
    return [message_object(n, m) for n, m in zip(numbers, messages, strict=True)]


def _page(items: list[ConversationMessage], limit: int, more: bool = False) -> ConversationItemList:
    page = items[:limit]
    return ConversationItemList(
        object="list",
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=more or len(items) > limit,
    )


@operation(
    "Create a conversation",
    description="Opens a session holding up to 20 messages, without calling a model; "
    "continue it with `conversation` on /v1/responses (or as a session id).",
    tags=("conversations",),
    body=ConversationCreate,
    body_examples={
        "with items": {
            "items": [{"type": "message", "role": "user", "content": "Hello"}],
            "metadata": {"topic": "demo"},
        }
    },
    ok=ConversationObject,
    errors=(400, 413, 415, 503, 504),
)
async def create_conversation(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    require_scope(principal, "chat")
    body = decode(await read_body(request), ConversationCreate)
    command = OpenConversation(
        session_id=f"conv_{uuid.uuid4().hex}",
        tenant=principal.tenant,
        key_id=principal.key_id,
        user=principal.user,
        messages=to_messages(body.items),
        metadata=body.metadata or {},
    )
    return json_response(_conversation(await _ask(request, command)))


@operation(
    "Retrieve a conversation",
    tags=("conversations",),
    path=_ON_CONVERSATION,
    ok=ConversationObject,
    errors=_READ_ERRORS,
)
async def get_conversation(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    require_scope(principal, "chat", "audit")
    command = GetSession(
        session_id=_conversation_id(request), tenant=principal.tenant, user=principal.user
    )
    return json_response(_conversation(await _ask(request, command)))


@operation(
    "Update a conversation",
    description="Replaces the conversation's metadata.",
    tags=("conversations",),
    path=_ON_CONVERSATION,
    body=ConversationUpdate,
    ok=ConversationObject,
    errors=_WRITE_ERRORS,
)
async def update_conversation(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    require_scope(principal, "chat")
    session_id = _conversation_id(request)
    body = decode(await read_body(request), ConversationUpdate)
    command = UpdateMetadata(
        session_id=session_id,
        tenant=principal.tenant,
        key_id=principal.key_id,
        user=principal.user,
        metadata=body.metadata,
    )
    return json_response(_conversation(await _ask(request, command)))


@operation(
    "Delete a conversation",
    description="As DELETE /v1/sessions/{id}: its events are erased from the log and its "
    "memories from the index; a tombstone remains.",
    tags=("conversations",),
    path=_ON_CONVERSATION,
    ok=ConversationDeletedObject,
    errors=_READ_ERRORS,
)
async def delete_conversation(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    require_scope(principal, "chat")
    command = DeleteSession(
        session_id=_conversation_id(request),
        tenant=principal.tenant,
        key_id=principal.key_id,
        user=principal.user,
    )
    try:
        reply = await ask_session(
            request.app[NATS], command, request.app[CONFIG].server.accept_timeout
        )
    except ApiError as error:
        if error.status == 404:
            raise _not_found(command.session_id) from None
        raise
    if not isinstance(reply, SessionDeleted):
        raise ApiError(500, "Unexpected reply from the session actor.", code="actor_failed")
    return json_response(
        ConversationDeletedObject(id=reply.session_id, object="conversation.deleted", deleted=True)
    )


@operation(
    "List a conversation's items",
    description="The messages of the session's history, one item each (newest first "
    "unless `order=asc`).",
    tags=("conversations",),
    path=_ON_CONVERSATION,
    query=(
        Param("after", ITEM_ID, "List the items after this one (the last page's last_id)."),
        Param("limit", Annotated[int, Meta(ge=1, le=MAX_ITEMS_PAGE)], "At most this many (20)."),
        Param("order", str, "`asc` or `desc` (the default, newest first)."),
    ),
    ok=ConversationItemList,
    errors=(400, *_READ_ERRORS),
)
async def list_items(request: web.Request) -> web.Response:
    query = request.query
    order = list_order(query)
    limit = list_limit(query)
    after = query.get("after")
    if after is not None and item_number(after) is None:
        raise ApiError(400, "after must be an item id.", param="after", code="invalid_value")
    items = await _items(request)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [i.id for i in items]
        if after not in ids:
            raise ApiError(
                400,
                "after must be an item of this conversation.",
                param="after",
                code="invalid_value",
            )
        items = items[ids.index(after) + 1 :]
    return json_response(_page(items, limit))


@operation(
    "Create items",
    description="Appends up to 20 messages to the conversation (between turns).",
    tags=("conversations",),
    path=_ON_CONVERSATION,
    body=ItemsCreate,
    ok=ConversationItemList,
    errors=_WRITE_ERRORS,
)
async def create_items(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    require_scope(principal, "chat")
    session_id = _conversation_id(request)
    body = decode(await read_body(request), ItemsCreate)
    messages = to_messages(body.items)
    command = AddItems(
        session_id=session_id,
        tenant=principal.tenant,
        key_id=principal.key_id,
        user=principal.user,
        messages=messages,
    )
    view = await _ask(request, command)
    first = view.item_count - len(messages)
    items = [message_object(first + i, m) for i, m in enumerate(messages)]
    return json_response(_page(items, len(items)))


@operation(
    "Retrieve an item",
    tags=("conversations",),
    path=_ON_ITEM,
    ok=ConversationMessage,
    errors=_READ_ERRORS,
)
async def get_item(request: web.Request) -> web.Response:
    require_scope(request[PRINCIPAL], "chat", "audit")
    value = request.match_info["item_id"]
    if item_number(value) is None:
        _conversation_id(request)  # a malformed conversation id is its own 404
        raise _item_not_found(value)
    for item in await _items(request):
        if item.id == value:
            return json_response(item)
    raise _item_not_found(value)


@operation(
    "Delete an item",
    description="Takes the message out of the history the model sees and out of the "
    "item lists (an `item.deleted` event: the log keeps its words until the session is "
    "deleted); answers the conversation.",
    tags=("conversations",),
    path=_ON_ITEM,
    ok=ConversationObject,
    errors=(404, 409, 503, 504),
)
async def delete_item(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    require_scope(principal, "chat")
    session_id = _conversation_id(request)
    value = request.match_info["item_id"]
    number = item_number(value)
    if number is None:
        raise _item_not_found(value)
    command = DeleteItem(
        session_id=session_id,
        tenant=principal.tenant,
        key_id=principal.key_id,
        user=principal.user,
        item=number,
    )
    try:
        view = await _ask(request, command)
    except ApiError as error:
        if error.code == "item_not_found":
            raise _item_not_found(value) from None
        raise
    return json_response(_conversation(view))


def add_conversation_routes(app: web.Application) -> None:
    app.router.add_post("/v1/conversations", create_conversation)
    app.router.add_get("/v1/conversations/{conversation_id}", get_conversation)
    app.router.add_post("/v1/conversations/{conversation_id}", update_conversation)
    app.router.add_delete("/v1/conversations/{conversation_id}", delete_conversation)
    app.router.add_get("/v1/conversations/{conversation_id}/items", list_items)
    app.router.add_post("/v1/conversations/{conversation_id}/items", create_items)
    app.router.add_get("/v1/conversations/{conversation_id}/items/{item_id}", get_item)
    app.router.add_delete("/v1/conversations/{conversation_id}/items/{item_id}", delete_item)
