"""A turn as an auditor sees it: what happened behind the curtain, built from the log alone.

`GET /v1/sessions/{id}/turns[/{turn_id}]` asks the session service with `GetTurns` and
gets `TurnsFound`: per turn, the pipeline and why, what memory and the knowledge base
put forward (with scores), the tools run, and every model call.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from eventstore.events import (
    ChatMessage,
    ModelCall,
    RecalledMemory,
    RetrievedChunk,
    ToolCall,
    ToolResult,
    Usage,
)

__all__ = [
    "MAX_TURNS_PAGE",
    "GetTurns",
    "MemoryStep",
    "PipelineStep",
    "RetrievalStep",
    "ToolStep",
    "TurnContent",
    "TurnStatus",
    "TurnTrace",
    "TurnsFound",
]

# The most turns one page lists.
MAX_TURNS_PAGE = 100

TurnStatus = Literal["running", "completed", "failed", "cancelled"]


class GetTurns(msgspec.Struct, frozen=True, kw_only=True, tag="get_turns"):
    """Gateway -> session actor: the traces of a session's turns, oldest first.

    One turn when `turn_id` is set; otherwise a page of up to `limit` turns
    after the turn `after` (OpenAI's list cursors).
    """

    session_id: str
    tenant: str
    user: str | None = None
    turn_id: str | None = None
    after: str | None = None
    limit: int = 20
    # Operator detail of failed calls (upstream addresses, exception names): admins only.
    details: bool = False
    # What the turn said (its messages in and its answer out): the Responses door reads it.
    content: bool = False


class PipelineStep(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str
    # How it was chosen: "only" (the model has one pipeline), else the router's own words
    # ("rule:keyword", "semantic", "classifier", "default", ...).
    means: str
    detail: str | None = None
    scores: dict[str, float] = {}
    runner_up: str | None = None
    runner_up_score: float | None = None


class MemoryStep(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    query: str
    hits: list[RecalledMemory] = []
    error: str | None = None


class RetrievalStep(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    collections: list[str]
    query: str
    chunks: list[RetrievedChunk] = []
    error: str | None = None


class ToolStep(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    # Which model step asked for these calls (1-based).
    step: int
    results: list[ToolResult] = []


class TurnContent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A turn's words, as its log holds them: the messages it added (after what the
    session already held was dropped), the client's system prompt, settings and metadata,
    and the answer (or, cancelled, what was produced until then)."""

    messages: list[ChatMessage] = []
    system: str | None = None
    params: dict[str, Any] = {}
    metadata: dict[str, str] = {}
    output: str = ""
    tool_calls: list[ToolCall] = []
    error_message: str | None = None


class TurnTrace(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    turn_id: str
    status: TurnStatus
    started_at: datetime
    ended_at: datetime | None = None
    # The public model the client asked for.
    model: str
    streaming: bool = False
    # The API the turn came through: "chat.completions", "messages" or "responses".
    door: str = "chat.completions"
    # How many messages the turn added (their text is in /messages).
    messages: int = 0
    pipeline: PipelineStep | None = None
    history_summarized: int | None = None
    prompt_trimmed: list[str] = []
    memory: list[MemoryStep] = []
    retrieval: list[RetrievalStep] = []
    tools: list[ToolStep] = []
    tool_loop_stopped: str | None = None
    model_calls: list[ModelCall] = []
    facts_extracted: int | None = None
    finish_reason: str | None = None
    usage: Usage = Usage()
    # Failed turns: the status and code the client was given.
    error_status: int | None = None
    error_code: str | None = None
    cancel_reason: str | None = None
    # Only when GetTurns asked for `content`.
    content: TurnContent | None = None


class TurnsFound(msgspec.Struct, frozen=True, kw_only=True, tag="turns"):
    turns: list[TurnTrace]
    has_more: bool = False
