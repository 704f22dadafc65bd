"""The gateway and the session actors: commands on `chat.session.<tenant>.<sid>.cmd`, their
replies, and a turn's output on `chat.session.<tenant>.<sid>.out.<turn>`.

Every command names its tenant: a session is found by (tenant, session id), so another
tenant's session of the same id is a different, free session."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from bus.codec import Codec
from contracts.conversations import (
    AddItems,
    DeleteItem,
    DeleteResponse,
    OpenConversation,
    UpdateMetadata,
)
from contracts.errors import ErrorInfo
from contracts.memory import MemoryHit
from contracts.turns import GetTurns, TurnsFound
from eventstore.events import ChatMessage, ToolCall, Usage

__all__ = [
    "CANCEL_CODEC",
    "OUTPUT_CODEC",
    "SESSION_COMMAND_CODEC",
    "TURN_REPLY_CODEC",
    "CancelRequest",
    "DeleteSession",
    "Delta",
    "Deltas",
    "GetSession",
    "MemoriesFound",
    "OutputUnion",
    "SearchMemories",
    "SessionCommandUnion",
    "SessionDeleted",
    "SessionView",
    "StartTurn",
    "ToolDelta",
    "TurnAccepted",
    "TurnDone",
    "TurnError",
    "TurnRejected",
    "TurnReplyUnion",
]


class StartTurn(msgspec.Struct, frozen=True, kw_only=True, tag="start_turn"):
    """Gateway -> session actor: run one chat turn."""

    command_id: str
    turn_id: str
    session_id: str
    # The gateway made the id for a new session: none may exist under it. Otherwise the
    # client named the session: the turn continues it, or opens it if the tenant has
    # none of that name (a deleted one stays deleted).
    new_session: bool
    # The gateway drew the new session's id at random: no log nor tombstone can exist.
    # (A first turn under an Idempotency-Key gets an id derived from the key instead.)
    random_id: bool = False
    tenant: str
    key_id: str
    model: str
    messages: list[ChatMessage]
    user_id: str | None = None
    # The key is pinned to `user_id`: only that user's sessions are found.
    user_bound: bool = False
    metadata: dict[str, str] = {}
    params: dict[str, Any] = {}
    stream: bool = False
    # A digest of the HTTP request: an Idempotency-Key reused with another body is refused.
    fingerprint: str | None = None
    # This HTTP request, when its turn id is not its own (a retry under an Idempotency-Key
    # shares its turn id): a client that leaves before its turn starts cancels this id.
    request_id: str | None = None
    # The API the request came through (recorded on the turn, for audits).
    door: str = "chat.completions"

    @property
    def abandon_id(self) -> str:
        """The id whose cancellation means that nobody waits for this request any more."""
        return self.request_id or self.turn_id


class GetSession(msgspec.Struct, frozen=True, kw_only=True, tag="get"):
    """Gateway -> session actor: the session's metadata, and its messages if asked."""

    session_id: str
    tenant: str
    messages: bool = False
    # The caller's key is pinned to this user: another user's session is not found.
    user: str | None = None
    # Audits: the digest of the state the read is answered from (actors/state_digest.py).
    digest: bool = False


class DeleteSession(msgspec.Struct, frozen=True, kw_only=True, tag="delete"):
    """Gateway -> session actor: forget the session everywhere."""

    session_id: str
    tenant: str
    key_id: str
    user: str | None = None


class SearchMemories(msgspec.Struct, frozen=True, kw_only=True, tag="search_memories"):
    """Gateway -> session actor: search the long-term memory this session can see."""

    session_id: str
    tenant: str
    query: str
    k: int = 10
    user: str | None = None


SessionCommandUnion = (
    StartTurn
    | GetSession
    | DeleteSession
    | SearchMemories
    | GetTurns
    | OpenConversation
    | AddItems
    | DeleteItem
    | UpdateMetadata
    | DeleteResponse
)


class MemoriesFound(msgspec.Struct, frozen=True, kw_only=True, tag="memories"):
    hits: list[MemoryHit]


class SessionView(msgspec.Struct, frozen=True, kw_only=True, tag="session"):
    session_id: str
    created_at: datetime
    updated_at: datetime
    turns: int
    usage: Usage
    model: str | None = None
    messages: list[ChatMessage] | None = None
    # Conversations: the session's metadata; how many item numbers were ever given out
    # (the next item's number); and, with `messages`, each message's item number.
    metadata: dict[str, str] = {}
    item_count: int = 0
    item_numbers: list[int] | None = None
    # With GetSession.digest: the state's digest, to compare with `veil replay --digest`.
    state_digest: str | None = None


class SessionDeleted(msgspec.Struct, frozen=True, kw_only=True, tag="deleted"):
    session_id: str
    events_erased: int
    memories_erased: int


class TurnAccepted(msgspec.Struct, frozen=True, kw_only=True, tag="accepted"):
    """The turn is in the log; its output follows on the turn's out subject.

    `replay` is set when the command was already handled: the out subject then
    only carries the recorded result.
    """

    turn_id: str
    replay: bool = False
    # The worker running the turn (its lease's holder): a gateway whose stream goes
    # quiet asks it whether it still runs the turn (actors/leases.py).
    holder: str | None = None


class TurnRejected(msgspec.Struct, frozen=True, kw_only=True, tag="rejected"):
    error: ErrorInfo


class Delta(msgspec.Struct, frozen=True, kw_only=True, tag="delta", omit_defaults=True):
    # 1-based, so the gateway can tell whether it missed one.
    seq: int
    text: str
    # Which of n choices (0 unless the client asked for several).
    choice: int = 0


class ToolDelta(msgspec.Struct, frozen=True, kw_only=True, tag="tool_delta", omit_defaults=True):
    """A piece of a tool call, as OpenAI streams it: id and name first, then arguments."""

    seq: int
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class TurnDone(msgspec.Struct, frozen=True, kw_only=True, tag="done"):
    content: str
    finish_reason: str
    usage: Usage
    tool_calls: list[ToolCall] = []
    alternatives: list[str] = []
    # How many deltas were published before this; the gateway waits for them.
    deltas: int = 0


class TurnError(msgspec.Struct, frozen=True, kw_only=True, tag="error"):
    error: ErrorInfo
    # Text already streamed before the failure.
    content: str = ""
    deltas: int = 0


class Deltas(msgspec.Struct, frozen=True, kw_only=True, tag="deltas"):
    """Deltas that the engine produced together (from one read of the upstream's
    stream), sent as one message: one publish and one HTTP write instead of many."""

    items: list[Delta | ToolDelta]


OutputUnion = Delta | ToolDelta | Deltas | TurnDone | TurnError

# A non-streaming turn is answered on its request with the result itself (TurnDone or
# TurnError): no output subject, one message instead of three.
TurnReplyUnion = (
    TurnAccepted
    | TurnRejected
    | SessionView
    | SessionDeleted
    | MemoriesFound
    | TurnsFound
    | TurnDone
    | TurnError
)


class CancelRequest(msgspec.Struct, frozen=True, kw_only=True):
    reason: str = "client_disconnected"


SESSION_COMMAND_CODEC: Codec[SessionCommandUnion] = Codec(SessionCommandUnion)
TURN_REPLY_CODEC: Codec[TurnReplyUnion] = Codec(TurnReplyUnion)
OUTPUT_CODEC: Codec[OutputUnion] = Codec(OutputUnion)
CANCEL_CODEC: Codec[CancelRequest] = Codec(CancelRequest)
