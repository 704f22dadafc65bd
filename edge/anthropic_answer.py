"""A finished turn as Anthropic's Message: content blocks, stop reason, usage."""

from __future__ import annotations

from collections.abc import Sequence

from contracts.session import StartTurn, TurnDone
from edge.anthropic_responses import (
    AnthropicMessage,
    MessageUsage,
    StopReason,
    TextOut,
    ToolUseOut,
)
from edge.anthropic_wire import tool_input
from eventstore.events import ToolCall, Usage

__all__ = ["message_id", "message_of", "stop_reason", "tool_blocks", "usage_of"]

# OpenAI's finish reasons, which every engine reports, in Anthropic's words. A stop
# sequence reads as a plain stop: the finish reason does not tell them apart.
_STOP_REASONS: dict[str, StopReason] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


def stop_reason(finish_reason: str) -> StopReason:
    return _STOP_REASONS.get(finish_reason, "end_turn")


def message_id(start: StartTurn) -> str:
    """The message's id: the turn's, as the session's log and turn traces know it."""
    return f"msg_{start.turn_id}"


def usage_of(usage: Usage) -> MessageUsage:
    return MessageUsage(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        cache_creation_input_tokens=0,
        cache_read_input_tokens=0,
    )


def tool_blocks(calls: Sequence[ToolCall]) -> list[ToolUseOut]:
    return [
        ToolUseOut(id=c.id, name=c.function.name, input=tool_input(c.function.arguments))
        for c in calls
    ]


def message_of(start: StartTurn, done: TurnDone) -> AnthropicMessage:
    content: list[TextOut | ToolUseOut] = [TextOut(text=done.content)] if done.content else []
    content.extend(tool_blocks(done.tool_calls))
    return AnthropicMessage(
        id=message_id(start),
        type="message",
        role="assistant",
        model=start.model,
        content=content,
        stop_reason=stop_reason(done.finish_reason),
        stop_sequence=None,
        usage=usage_of(done.usage),
        session_id=start.session_id,
    )
