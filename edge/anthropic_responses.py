"""The bodies the Anthropic door answers with, as types: a Message, the events of its
stream, a token count, and Anthropic's error. What the handlers encode is what
`GET /openapi.json` describes (as edge/responses.py does for the OpenAI doors).

The shapes follow Anthropic's API as the official SDK reads them (anthropic.types:
Message, RawMessageStreamEvent, ErrorResponse); Veil adds `session_id` to a Message.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "AnthropicError",
    "AnthropicErrorBody",
    "AnthropicMessage",
    "ContentBlockDelta",
    "ContentBlockStart",
    "ContentBlockStop",
    "DeltaUsage",
    "ErrorType",
    "InputJsonDelta",
    "MessageDelta",
    "MessageDeltaBody",
    "MessageStart",
    "MessageStop",
    "MessageUsage",
    "Ping",
    "StopReason",
    "StreamEvent",
    "TextDelta",
    "TextOut",
    "TokenCount",
    "ToolUseOut",
]

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal"]
ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "timeout_error",
    "conflict_error",
    "api_error",
    "overloaded_error",
]


class AnthropicError(msgspec.Struct, kw_only=True):
    type: ErrorType
    message: str


class AnthropicErrorBody(msgspec.Struct, kw_only=True):
    """Every error of this door, as Anthropic sends it (also as a stream's `error` event)."""

    type: Literal["error"]
    error: AnthropicError


class TextOut(msgspec.Struct, tag="text", tag_field="type", kw_only=True):
    text: str


class ToolUseOut(msgspec.Struct, tag="tool_use", tag_field="type", kw_only=True):
    id: str
    name: str
    input: dict[str, Any]


class MessageUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    output_tokens: int
    # Veil caches no prompt: always 0, sent because Anthropic's clients read them.
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


class AnthropicMessage(msgspec.Struct, kw_only=True):
    """A Message. `stop_sequence` is always null: the engines report a stop sequence as
    a plain stop (OpenAI's finish reason does not tell them apart)."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[TextOut | ToolUseOut]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: MessageUsage
    session_id: str


class TokenCount(msgspec.Struct, kw_only=True):
    """An estimate (characters over four), not a model's own tokenizer."""

    input_tokens: int


# -- a stream's events: `event: <type>` and `data: <the event as JSON>` --------------------


class MessageStart(msgspec.Struct, tag="message_start", tag_field="type", kw_only=True):
    """The message with no content yet; its usage is zero until `message_delta`."""

    message: AnthropicMessage


class ContentBlockStart(msgspec.Struct, tag="content_block_start", tag_field="type", kw_only=True):
    index: int
    content_block: TextOut | ToolUseOut


class TextDelta(msgspec.Struct, tag="text_delta", tag_field="type", kw_only=True):
    text: str


class InputJsonDelta(msgspec.Struct, tag="input_json_delta", tag_field="type", kw_only=True):
    partial_json: str


class ContentBlockDelta(msgspec.Struct, tag="content_block_delta", tag_field="type", kw_only=True):
    index: int
    delta: TextDelta | InputJsonDelta


class ContentBlockStop(msgspec.Struct, tag="content_block_stop", tag_field="type", kw_only=True):
    index: int


class MessageDeltaBody(msgspec.Struct, kw_only=True):
    stop_reason: StopReason | None
    stop_sequence: str | None


class DeltaUsage(msgspec.Struct, kw_only=True):
    """The turn's totals (cumulative, as Anthropic's clients take them)."""

    input_tokens: int
    output_tokens: int


class MessageDelta(msgspec.Struct, tag="message_delta", tag_field="type", kw_only=True):
    delta: MessageDeltaBody
    usage: DeltaUsage


class MessageStop(msgspec.Struct, tag="message_stop", tag_field="type", kw_only=True):
    pass


class Ping(msgspec.Struct, tag="ping", tag_field="type", kw_only=True):
    pass


StreamEvent = (
    MessageStart
    | ContentBlockStart
    | ContentBlockDelta
    | ContentBlockStop
    | MessageDelta
    | MessageStop
    | Ping
)
