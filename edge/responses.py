"""The bodies the gateway answers with, as types: what the handlers encode and what
`GET /openapi.json` describes, so the two cannot drift apart.

No field has a default, except those typed `UnsetType`: a field that is always sent is
`required` in the generated schema, and one that may be left out is not (msgspec never
encodes UNSET). Object names and `null`s follow OpenAI's own responses.

Some bodies are still built as dicts by their handlers (API keys, knowledge, health);
their types here describe them, and tests/test_openapi.py checks real answers against
the schema with unknown fields refused, so a key added to the dict alone fails there.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from contracts.keys import BudgetPeriod
from contracts.turns import MemoryStep, PipelineStep, RetrievalStep, ToolStep, TurnStatus
from eventstore.events import ModelCall, Usage

__all__ = [
    "ApiKeyList",
    "ApiKeyObject",
    "AssistantMessage",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Choice",
    "ChunkChoice",
    "ChunkDelta",
    "CompletionUsage",
    "ErrorBody",
    "ErrorDetail",
    "FunctionCallOut",
    "FunctionDelta",
    "Health",
    "KnowledgeAnswer",
    "MemoryList",
    "MessageList",
    "Model",
    "ModelList",
    "SessionDeletedObject",
    "SessionMemory",
    "SessionMessage",
    "SessionObject",
    "SessionTurn",
    "ToolCallDelta",
    "ToolCallOut",
    "TurnList",
]


# -- errors -----------------------------------------------------------------------------------


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error, as OpenAI sends it (also as the last event of a stream that fails)."""

    error: ErrorDetail


# -- chat completions -------------------------------------------------------------------------


class CompletionUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(msgspec.Struct, kw_only=True):
    name: str
    arguments: str


class ToolCallOut(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"]
    content: str | None
    refusal: None
    tool_calls: list[ToolCallOut] | UnsetType = UNSET


class Choice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: str


class ChatCompletion(msgspec.Struct, kw_only=True):
    """A `chat.completion`; with n > 1 the session continues from choice 0."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    session_id: str


class FunctionDelta(msgspec.Struct, kw_only=True):
    name: str | UnsetType = UNSET
    arguments: str


class ToolCallDelta(msgspec.Struct, kw_only=True):
    index: int
    id: str | UnsetType = UNSET
    type: Literal["function"] | UnsetType = UNSET
    function: FunctionDelta


class ChunkDelta(msgspec.Struct, kw_only=True):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChunkDelta
    logprobs: None
    finish_reason: str | None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    """One `data:` event of a streamed completion. With `stream_options.include_usage`
    every chunk has `usage: null` and a last chunk with no choices carries the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    session_id: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None | UnsetType = UNSET


# -- models -----------------------------------------------------------------------------------


class Model(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[Model]


# -- sessions ---------------------------------------------------------------------------------


class SessionObject(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    object: Literal["session"]
    created_at: int
    updated_at: int
    model: str | None
    turns: int
    usage: CompletionUsage
    # Audit and admin keys only: the digest of the session's state as the live actor holds
    # it, equal to `veil replay --digest` of its log.
    state_digest: str | None = None


class SessionMessage(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["session.message"]
    role: str
    content: str


class MessageList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[SessionMessage]
    first_id: str | None
    last_id: str | None
    has_more: bool


class SessionMemory(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["session.memory"]
    session_id: str
    role: str
    kind: str
    content: str
    score: float
    vector_similarity: float | None
    bm25: float | None
    created_at: int


class MemoryList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[SessionMemory]
    has_more: bool


class SessionDeletedObject(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["session.deleted"]
    deleted: bool


class SessionTurn(msgspec.Struct, kw_only=True):
    """What happened behind the curtain in one turn, from the log alone. Built as a dict
    from contracts.turns.TurnTrace: a field at its default (empty, zero, none) is left out."""

    id: str
    object: Literal["session.turn"]
    status: TurnStatus
    started_at: int
    ended_at: int | UnsetType = UNSET
    model: str
    # The API the turn came through: "chat.completions", "messages" or "responses".
    door: str
    streaming: bool | UnsetType = UNSET
    messages: int | UnsetType = UNSET
    pipeline: PipelineStep | UnsetType = UNSET
    history_summarized: int | UnsetType = UNSET
    prompt_trimmed: list[str] | UnsetType = UNSET
    memory: list[MemoryStep] | UnsetType = UNSET
    retrieval: list[RetrievalStep] | UnsetType = UNSET
    tools: list[ToolStep] | UnsetType = UNSET
    tool_loop_stopped: str | UnsetType = UNSET
    model_calls: list[ModelCall] | UnsetType = UNSET
    facts_extracted: int | UnsetType = UNSET
    finish_reason: str | UnsetType = UNSET
    usage: Usage | UnsetType = UNSET
    error_status: int | UnsetType = UNSET
    error_code: str | UnsetType = UNSET
    cancel_reason: str | UnsetType = UNSET


class TurnList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[SessionTurn]
    first_id: str | None
    last_id: str | None
    has_more: bool


# -- admin and operations (built as dicts by their handlers) ----------------------------------


class ApiKeyObject(msgspec.Struct, kw_only=True):
    """A managed API key: never its digest; the secret only in the answer that made it."""

    id: str
    object: Literal["api_key"]
    hint: str
    tenant: str
    name: str | None
    scopes: list[Literal["chat", "audit", "admin"]]
    models: list[str]
    user: str | None
    created_at: int
    expires_at: int | None
    revoked_at: int | None
    rotated_at: int | None
    # Its limits and budgets (None: no such limit).
    rpm: int | None
    tpm: int | None
    concurrency: int | None
    budget_tokens: int | None
    budget_usd: float | None
    budget_period: BudgetPeriod
    key: str | UnsetType = UNSET
    revoked: bool | UnsetType = UNSET


class ApiKeyList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[ApiKeyObject]


class KnowledgeAnswer(msgspec.Struct, kw_only=True):
    """`object` is `knowledge.` and the action (list, documents, add, remove)."""

    object: str
    data: Any


class Health(msgspec.Struct, kw_only=True):
    status: Literal["ok", "degraded"]
    nats: bool
