"""What the sessions API answers, as the SDK's own models: typed fields, and every other
field the server sends kept as an attribute (`model_extra`), so a newer server loses nothing."""

from __future__ import annotations

from openai import BaseModel
from openai.types import CompletionUsage

__all__ = [
    "Memory",
    "MemoryList",
    "Message",
    "MessageList",
    "SessionDeleted",
    "SessionInfo",
    "Turn",
    "TurnList",
]


class SessionInfo(BaseModel):
    """GET /v1/sessions/{id}: when it began and last changed, its turns and usage."""

    id: str
    object: str = "session"
    created_at: int
    updated_at: int
    model: str | None = None
    turns: int
    usage: CompletionUsage


class Message(BaseModel):
    """One message of the conversation as the model sees it."""

    id: str
    object: str = "session.message"
    role: str
    content: str


class MessageList(BaseModel):
    data: list[Message]
    has_more: bool = False


class Memory(BaseModel):
    """A long-term memory the session can see, with the scores that found it."""

    id: str
    object: str = "session.memory"
    session_id: str
    role: str
    kind: str
    content: str
    score: float
    vector_similarity: float | None = None
    bm25: float | None = None
    created_at: int


class MemoryList(BaseModel):
    data: list[Memory]
    has_more: bool = False


class Turn(BaseModel):
    """What happened behind the curtain in one turn; the rest (pipeline, memory, retrieval,
    tools, model_calls, ...) are attributes too, present when the turn has them."""

    id: str
    object: str = "session.turn"
    status: str  # running, completed, failed, cancelled
    started_at: int
    ended_at: int | None = None
    model: str
    finish_reason: str | None = None
    usage: CompletionUsage | None = None


class TurnList(BaseModel):
    data: list[Turn]
    last_id: str | None = None
    has_more: bool = False


class SessionDeleted(BaseModel):
    id: str
    object: str = "session.deleted"
    deleted: bool
