"""The events of a session's log.

Tags are permanent: they are stored in JetStream and read back years later.
Never derive them from class names, never rename them. Evolve a schema by
adding fields with defaults or by adding a new event type; unknown fields in
stored events are ignored on read, so newer writers do not break older readers.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import msgspec

__all__ = [
    "ChatMessage",
    "DocumentsRetrieved",
    "Event",
    "EventUnion",
    "FactsExtracted",
    "FunctionCall",
    "HistorySummarized",
    "ItemDeleted",
    "ItemsAdded",
    "MemoryRecalled",
    "MetadataUpdated",
    "ModelCall",
    "ModelCalled",
    "PipelineChosen",
    "PromptTrimmed",
    "RecalledMemory",
    "ReplyCompleted",
    "ResponseDeleted",
    "RetrievedChunk",
    "SessionOpened",
    "ToolCall",
    "ToolLoopStopped",
    "ToolResult",
    "ToolsCalled",
    "TurnCancelled",
    "TurnFailed",
    "TurnStarted",
    "Usage",
    "model_calls",
]


class FunctionCall(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    # JSON text as the model wrote it (it may not even be valid JSON).
    arguments: str


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A model's request to call a tool, in OpenAI's shape."""

    id: str
    function: FunctionCall
    type: str = "function"


# gc=False (here, on Usage and on actors.session.TurnOutcome): immutable values that
# cannot form a cycle, so the cycle collector need not track them. A session's state
# holds thousands; tracked, decoding one from a snapshot set off collections that took
# its activation from 17 to 26 ms (bench/session_activation.py, 10,000 events).
class ChatMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """One message of a conversation, as the model sees it."""

    role: str
    content: str
    name: str | None = None
    # An assistant message that called tools, and a tool message that answers one.
    tool_calls: tuple[ToolCall, ...] | None = None
    tool_call_id: str | None = None


class Usage(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every stored event. `at` is set by the shell, never by evolve."""

    at: datetime


class SessionOpened(Event, tag="session.opened", frozen=True, kw_only=True):
    session_id: str
    tenant: str
    # A hash of the API key that opened the session, never the key itself.
    key_id: str
    # The end user the client named when it opened the session (`user` or
    # `metadata.user_id`); long-term memory is shared across that user's sessions.
    user_id: str | None = None


class TurnStarted(Event, tag="turn.started", frozen=True, kw_only=True):
    turn_id: str
    command_id: str
    # The public model name the client asked for.
    model: str
    # Only the messages this turn adds to the conversation.
    messages: list[ChatMessage]
    # The client's own system prompt, if it sent one this turn.
    system: str | None = None
    # Generation parameters the client set (temperature, max_tokens, ...).
    params: dict[str, Any] = {}
    # The request's metadata (routing rules may read it).
    metadata: dict[str, str] = {}
    # Another writer may take the session over once this has passed.
    lease_until: datetime
    streaming: bool = False
    # Set when the model has one pipeline: the choice needs no router and no event of its own.
    pipeline: str | None = None
    # The worker process running the turn: another writer asks it whether it still does
    # before waiting out the lease (None in logs written before holders were recorded).
    holder: str | None = None
    # A digest of the request that started the turn: a retry under the same
    # Idempotency-Key with a different request is refused.
    fingerprint: str | None = None
    # Who asked for this turn: the key and the end user (usage is billed to them). None in
    # logs written before turns recorded them: the SessionOpened's key and user then.
    key_id: str | None = None
    user_id: str | None = None
    # The API the request came through: "chat.completions", "messages" (Anthropic's) or
    # "responses". None in logs written before doors were recorded: chat completions.
    door: str | None = None


class ModelCall(msgspec.Struct, frozen=True, kw_only=True):
    """One call to an upstream engine, successful or not: the one shape of a model call,
    whether a ModelCalled records it or the ReplyCompleted whose answer it produced."""

    engine: str
    upstream_model: str
    latency_ms: float
    ttft_ms: float | None = None
    usage: Usage | None = None
    # The upstream reported no usage: `usage` is Veil's estimate of the text.
    usage_estimated: bool = False
    finish_reason: str | None = None
    error: str | None = None
    status: int | None = None
    # "reply" for the answer, "summary" for folding old turns, "facts" for extraction.
    purpose: str = "reply"


class ModelCalled(Event, tag="model.called", frozen=True, kw_only=True):
    """A model call that did not produce the turn's answer: a failed attempt, a tool
    step, a summary, a fact extraction (the answer's call is in its ReplyCompleted)."""

    turn_id: str
    call: ModelCall


class HistorySummarized(Event, tag="history.summarized", frozen=True, kw_only=True):
    """Older turns folded into a running summary that replaces them in prompts."""

    turn_id: str
    summary: str
    # How many messages of the history, from the start, the summary now covers.
    covers: int


class PipelineChosen(Event, tag="pipeline.chosen", frozen=True, kw_only=True):
    """Which pipeline answers the turn, by which means, and what it won against."""

    turn_id: str
    pipeline: str
    # rule:keyword | rule:pattern | rule:metadata | pinned | semantic | classifier | default | only
    means: str
    detail: str | None = None
    scores: dict[str, float] = {}
    runner_up: str | None = None
    runner_up_score: float | None = None


class RecalledMemory(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One recalled memory: where it comes from, how it scored, whether it was used."""

    id: str
    session_id: str
    # The event in `session_id`'s log the memory was made from.
    source_seq: int
    kind: str
    role: str
    score: float
    vector_similarity: float | None = None
    bm25: float | None = None
    used: bool = False
    # Inline only for this session's own memories; another session's text is
    # referenced by (session_id, source_seq), so deleting that session deletes it.
    text: str | None = None


class MemoryRecalled(Event, tag="memory.recalled", frozen=True, kw_only=True):
    """What long-term memory returned for a turn, and what of it went into the prompt."""

    turn_id: str
    query: str
    # The end user whose other sessions were searched too, if any.
    user_id: str | None = None
    hits: list[RecalledMemory] = []
    error: str | None = None


class FactsExtracted(Event, tag="facts.extracted", frozen=True, kw_only=True):
    """Short statements a pipeline's model drew from a turn, for long-term memory."""

    turn_id: str
    facts: list[str]


class ToolResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    call_id: str
    name: str
    arguments: str
    content: str = ""
    error: str | None = None
    duration_ms: float = 0.0


class ToolsCalled(Event, tag="tools.called", frozen=True, kw_only=True):
    """One step of a hidden tool loop: the model's calls and what each server tool returned."""

    turn_id: str
    # The model's message that made the calls (its text, if any, and the calls).
    assistant: ChatMessage
    results: list[ToolResult]


class ToolLoopStopped(Event, tag="tools.stopped", frozen=True, kw_only=True):
    """The tool loop hit its step limit; the answer is the best so far."""

    turn_id: str
    steps: int
    reason: str = "step_limit"


class PromptTrimmed(Event, tag="prompt.trimmed", frozen=True, kw_only=True):
    """What the turn's prompt left out to fit the model's context window.

    Every part is budgeted in one window (`context_window` minus the tokens kept
    for the reply); what gives way first: recalled memories, then retrieved
    documents, then the running summary, while history keeps its newest messages
    in what is left.
    """

    turn_id: str
    # Parts left out whole: "memories", "documents", "summary".
    dropped: list[str] = []
    # Messages of the history (past the summary) that the prompt left out.
    history_left_out: int = 0
    # The window, what was kept for the reply, and the prompt's estimated size.
    window: int = 0
    reply_reserve: int = 0
    prompt_tokens: int = 0


class RetrievedChunk(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A chunk that went into the prompt: its source and position, and how it scored."""

    # Content-based: it resolves to the text through the KB_EVENTS log.
    id: str
    collection: str
    path: str
    sha256: str
    chunk: int
    offset: int
    page: int | None = None
    score: float
    similarity: float


class DocumentsRetrieved(Event, tag="documents.retrieved", frozen=True, kw_only=True):
    turn_id: str
    collections: list[str]
    query: str
    chunks: list[RetrievedChunk] = []
    error: str | None = None


class ReplyCompleted(Event, tag="reply.completed", frozen=True, kw_only=True):
    """The answer the client got, and the model call that produced it.

    Every model call is recorded once: this one here (one append fewer per turn),
    every other in a ModelCalled. `call` is None in logs written before replies
    carried their call (that call is in a ModelCalled just before).
    """

    turn_id: str
    content: str
    finish_reason: str
    usage: Usage
    # Calls to the client's tools; the client answers them in its next request.
    tool_calls: list[ToolCall] = []
    # With n > 1, the other choices the client received; the session goes on from `content`.
    alternatives: list[str] = []
    # No default: a record without the key is of an older shape (see eventstore.upcast).
    call: ModelCall | None


class TurnFailed(Event, tag="turn.failed", frozen=True, kw_only=True):
    turn_id: str
    status: int
    code: str
    message: str


class TurnCancelled(Event, tag="turn.cancelled", frozen=True, kw_only=True):
    """The client went away; what the model produced until then is kept."""

    turn_id: str
    content: str = ""
    usage: Usage = Usage()
    reason: str = "client_disconnected"


# Conversations (/v1/conversations): a session changed without a turn.


class ItemsAdded(Event, tag="items.added", frozen=True, kw_only=True):
    """Messages appended to the session's history without calling a model."""

    messages: list[ChatMessage]


class ItemDeleted(Event, tag="item.deleted", frozen=True, kw_only=True):
    """A message taken out of the history the model sees. `item` is its number: its
    position among every message the history ever held (deleted ones keep theirs)."""

    item: int


class ResponseDeleted(Event, tag="response.deleted", frozen=True, kw_only=True):
    """A turn deleted as a response (DELETE /v1/responses/{id}): its messages leave the
    history the model sees and the item lists, and it is read back as a free id. Its
    words stay in the log until the session is deleted."""

    turn_id: str


class MetadataUpdated(Event, tag="metadata.updated", frozen=True, kw_only=True):
    """The session's metadata, replaced whole."""

    metadata: dict[str, str]


EventUnion = (
    SessionOpened
    | TurnStarted
    | ModelCalled
    | HistorySummarized
    | PipelineChosen
    | MemoryRecalled
    | DocumentsRetrieved
    | FactsExtracted
    | ToolsCalled
    | ToolLoopStopped
    | PromptTrimmed
    | ReplyCompleted
    | TurnFailed
    | TurnCancelled
    | ItemsAdded
    | ItemDeleted
    | MetadataUpdated
    | ResponseDeleted
)


def model_calls(events: Iterable[object]) -> list[ModelCall]:
    """Every model call of a log, in order (for audits and usage)."""
    calls: list[ModelCall] = []
    for event in events:
        call = event.call if isinstance(event, ModelCalled | ReplyCompleted) else None
        if call is not None:
            calls.append(call)
    return calls
