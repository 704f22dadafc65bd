"""OpenAI's Conversations API on Veil's sessions: requests decoded and checked, the
answers as types (what the handlers encode and /openapi.json describes; shapes as in the
openai SDK's openai/types/conversations/), and item ids.

A conversation is a session: its id is the session id (a conversation Veil opens is
named `conv_...`), so the same id works on /v1/conversations, /v1/sessions and as
`conversation` on /v1/responses. Its items are the messages of the session's history,
one item per message, each with a stable id: `msg_<n>`, where n is the message's
position among every message the history ever held (a deleted item keeps its number,
so no id is reused or shifts).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta

from edge.openai_wire import (
    MAX_METADATA_KEY,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE,
    ApiError,
)
from edge.responses_objects import InputTextOut, OutputText
from eventstore.events import ChatMessage

__all__ = [
    "MAX_NEW_ITEMS",
    "ConversationCreate",
    "ConversationDeletedObject",
    "ConversationItemList",
    "ConversationMessage",
    "ConversationObject",
    "ConversationUpdate",
    "ItemsCreate",
    "decode",
    "item_id",
    "item_number",
    "message_object",
    "to_messages",
]

# Items per create request (OpenAI's bound), content parts per message.
MAX_NEW_ITEMS = 20
MAX_PARTS = 256
T = TypeVar("T")
_ITEM_ID = re.compile(r"^msg_(0|[1-9][0-9]{0,8})$")

Metadata = Annotated[
    dict[
        Annotated[str, Meta(max_length=MAX_METADATA_KEY)],
        Annotated[str, Meta(max_length=MAX_METADATA_VALUE)],
    ],
    Meta(max_length=MAX_METADATA_PAIRS, description="Up to 16 pairs; keys 64, values 512."),
]


class ItemInputText(msgspec.Struct, tag="input_text", tag_field="type", kw_only=True):
    text: str


class ItemOutputText(msgspec.Struct, tag="output_text", tag_field="type", kw_only=True):
    text: str


class ItemMessage(msgspec.Struct, kw_only=True):
    """A message item: a string, or input_text/output_text parts."""

    role: Literal["user", "assistant"]
    content: str | Annotated[list[ItemInputText | ItemOutputText], Meta(max_length=MAX_PARTS)]
    type: Literal["message"] = "message"


Items = Annotated[list[ItemMessage], Meta(max_length=MAX_NEW_ITEMS)]


class ConversationCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A new conversation, holding up to 20 messages (no model is called)."""

    items: Items | None = None
    metadata: Metadata | None = None


class ConversationUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The conversation's metadata, replaced whole."""

    metadata: Metadata


class ItemsCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Up to 20 messages appended to the conversation."""

    items: Annotated[list[ItemMessage], Meta(min_length=1, max_length=MAX_NEW_ITEMS)]


def decode(body: bytes, kind: type[T]) -> T:
    """Decode and check a request body; raises ApiError (400)."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as error:
        text, _, path = str(error).partition(" - at `$")
        param = path.rstrip("`").lstrip(".") or None
        message = f"Invalid '{param}': {text}" if param else text
        raise ApiError(400, message, param=param, code="invalid_value") from None
    except msgspec.DecodeError:
        raise ApiError(
            400, "We could not parse the JSON body of your request.", code="invalid_json"
        ) from None
    except RecursionError:
        raise ApiError(400, "The JSON body nests too deeply.", code="invalid_value") from None


def to_messages(items: list[ItemMessage] | None) -> list[ChatMessage]:
    content = [
        m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        for m in items or ()
    ]
    return [ChatMessage(role=m.role, content=c) for m, c in zip(items or (), content, strict=True)]


def item_id(number: int) -> str:
    return f"msg_{number}"


def item_number(value: str) -> int | None:
    """The item number an item id names, or None when it names none."""
    match = _ITEM_ID.match(value)
    return int(match.group(1)) if match else None


class ConversationObject(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["conversation"]
    created_at: int
    metadata: dict[str, str]


class ConversationDeletedObject(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["conversation.deleted"]
    deleted: bool


class ConversationMessage(msgspec.Struct, tag="message", tag_field="type", kw_only=True):
    """One message of the history. A tool call's answer is a `tool` message; an
    assistant message that called tools shows its text (the calls are in the session's
    turns, /v1/sessions/{id}/turns)."""

    id: str
    status: Literal["completed"]
    role: str
    content: list[InputTextOut | OutputText]


class ConversationItemList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[ConversationMessage]
    first_id: str | None
    last_id: str | None
    has_more: bool


def message_object(number: int, message: ChatMessage) -> ConversationMessage:
    part: InputTextOut | OutputText
    if message.role == "assistant":
        part = OutputText(text=message.content, annotations=[])
    else:
        part = InputTextOut(text=message.content)
    return ConversationMessage(
        id=item_id(number), status="completed", role=message.role, content=[part]
    )
