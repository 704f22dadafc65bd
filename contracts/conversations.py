"""Conversations (/v1/conversations): a session changed without a turn.

The gateway sends these on the session's command subject, as every session command; the
session actor answers each with the session's `SessionView` after the change (or a
`TurnRejected`). Another tenant's session of the same id is a different, free one.
"""

from __future__ import annotations

import msgspec

from eventstore.events import ChatMessage

__all__ = [
    "AddItems",
    "ConversationEdit",
    "DeleteItem",
    "DeleteResponse",
    "OpenConversation",
    "UpdateMetadata",
]


class OpenConversation(msgspec.Struct, frozen=True, kw_only=True, tag="open_conversation"):
    """Open a session holding `messages` (no model is called); its id is new."""

    session_id: str
    tenant: str
    key_id: str
    # The user the caller's key is pinned to: the session is that user's.
    user: str | None = None
    messages: list[ChatMessage] = []
    metadata: dict[str, str] = {}


class AddItems(msgspec.Struct, frozen=True, kw_only=True, tag="add_items"):
    """Append messages to an existing session's history."""

    session_id: str
    tenant: str
    key_id: str
    user: str | None = None
    messages: list[ChatMessage]


class DeleteItem(msgspec.Struct, frozen=True, kw_only=True, tag="delete_item"):
    """Take one message (by its item number) out of the history the model sees."""

    session_id: str
    tenant: str
    key_id: str
    user: str | None = None
    item: int


class UpdateMetadata(msgspec.Struct, frozen=True, kw_only=True, tag="update_metadata"):
    """Replace the session's metadata."""

    session_id: str
    tenant: str
    key_id: str
    user: str | None = None
    metadata: dict[str, str]


class DeleteResponse(msgspec.Struct, frozen=True, kw_only=True, tag="delete_response"):
    """Delete a response (a closed turn, by its id): its messages leave the history the
    model sees, and it reads back as a free id (DELETE /v1/responses/{id})."""

    session_id: str
    tenant: str
    key_id: str
    user: str | None = None
    turn_id: str


ConversationEdit = OpenConversation | AddItems | DeleteItem | UpdateMetadata | DeleteResponse
