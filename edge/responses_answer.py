"""A turn as OpenAI's response object: its output items, status, usage and the settings it
ran with; from a finished turn (POST) or from the session's log (GET)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from contracts.turns import TurnTrace
from edge.responses_objects import (
    ConversationRef,
    FunctionCallItem,
    FunctionCallOutputItem,
    IncompleteDetails,
    InputItem,
    InputMessageItem,
    InputTextOut,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseObject,
    ResponseStatus,
    ResponseUsage,
)
from edge.responses_objects import InputTokensDetails as _InDetails
from edge.responses_objects import OutputTokensDetails as _OutDetails
from edge.responses_wire import ResponsesRequest, response_id
from eventstore.events import ChatMessage, ToolCall, Usage

__all__ = [
    "Settings",
    "call_item_id",
    "input_items",
    "message_item_id",
    "output_items",
    "response_object",
    "settings_of_request",
    "settings_of_trace",
    "traced_response",
    "usage_of",
]


@dataclass(frozen=True, slots=True)
class Settings:
    """What a response repeats of the request that made it."""

    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    conversation: str | None = None
    store: bool = True
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = field(default_factory=list)
    user: str | None = None


def settings_of_request(request: ResponsesRequest, conversation: str | None) -> Settings:
    return Settings(
        instructions=request.instructions,
        max_output_tokens=request.max_output_tokens,
        metadata=request.metadata or {},
        parallel_tool_calls=request.parallel_tool_calls is not False,
        previous_response_id=request.previous_response_id,
        conversation=conversation,
        store=request.store,
        temperature=request.temperature,
        top_p=request.top_p,
        tool_choice=request.tool_choice if request.tool_choice is not None else "auto",
        tools=list(request.tools or []),
        user=request.user,
    )


def _responses_tool(tool: Any) -> dict[str, Any]:
    """A chat-form function tool (as the log holds it) in the Responses form."""
    if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
        return {"type": "function", **tool["function"]}
    return tool if isinstance(tool, dict) else {}


def _responses_choice(choice: Any) -> str | dict[str, Any]:
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"type": "function", "name": choice["function"].get("name")}
    return choice if isinstance(choice, str | dict) else "auto"


def settings_of_trace(trace: TurnTrace) -> Settings:
    """The settings a logged turn ran with (what the log keeps of them)."""
    words = trace.content
    if words is None:
        return Settings()
    params = words.params
    return Settings(
        instructions=words.system,
        max_output_tokens=params.get("max_tokens"),
        metadata=dict(words.metadata),
        parallel_tool_calls=params.get("parallel_tool_calls") is not False,
        temperature=params.get("temperature"),
        top_p=params.get("top_p"),
        tool_choice=_responses_choice(params.get("tool_choice", "auto")),
        tools=[_responses_tool(t) for t in params.get("tools") or ()],
        user=params.get("user"),
    )


def message_item_id(turn_id: str) -> str:
    return f"msg_{turn_id}"


def call_item_id(turn_id: str, index: int) -> str:
    return f"fc_{turn_id}_{index}"


def output_items(turn_id: str, content: str, calls: Sequence[ToolCall]) -> list[OutputItem]:
    items: list[OutputItem] = []
    if content or not calls:
        text = OutputText(text=content, annotations=[])
        items.append(
            OutputMessage(
                id=message_item_id(turn_id), status="completed", role="assistant", content=[text]
            )
        )
    items.extend(
        FunctionCallItem(
            id=call_item_id(turn_id, i),
            call_id=c.id,
            name=c.function.name,
            arguments=c.function.arguments,
            status="completed",
        )
        for i, c in enumerate(calls)
    )
    return items


def usage_of(usage: Usage) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=_InDetails(cached_tokens=0),
        output_tokens=usage.completion_tokens,
        output_tokens_details=_OutDetails(reasoning_tokens=0),
        total_tokens=usage.total_tokens,
    )


def response_object(
    *,
    session_id: str,
    turn_id: str,
    created_at: int,
    model: str,
    settings: Settings,
    status: ResponseStatus,
    output: list[OutputItem],
    usage: Usage | None,
    finish_reason: str | None = None,
    error: ResponseError | None = None,
) -> ResponseObject:
    incomplete = None
    if status == "completed" and finish_reason in ("length", "content_filter"):
        status = "incomplete"
        incomplete = IncompleteDetails(
            reason="max_output_tokens" if finish_reason == "length" else "content_filter"
        )
    conversation = settings.conversation
    return ResponseObject(
        id=response_id(session_id, turn_id),
        object="response",
        created_at=created_at,
        status=status,
        error=error,
        incomplete_details=incomplete,
        instructions=settings.instructions,
        max_output_tokens=settings.max_output_tokens,
        metadata=settings.metadata,
        model=model,
        output=output,
        parallel_tool_calls=settings.parallel_tool_calls,
        previous_response_id=settings.previous_response_id,
        conversation=ConversationRef(id=conversation) if conversation else None,
        store=settings.store,
        temperature=settings.temperature,
        top_p=settings.top_p,
        tool_choice=settings.tool_choice,
        tools=settings.tools,
        usage=usage_of(usage) if usage is not None else None,
        user=settings.user,
        session_id=session_id,
    )


_STATUS: dict[str, ResponseStatus] = {
    "running": "in_progress",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}


def traced_response(session_id: str, trace: TurnTrace) -> ResponseObject:
    """A logged turn (its trace with content) as the response it was."""
    words = trace.content
    output = words.output if words is not None else ""
    calls = words.tool_calls if words is not None else []
    status = _STATUS[trace.status]
    error = None
    if trace.status == "failed":
        message = words.error_message if words is not None else None
        error = ResponseError(code=trace.error_code or "server_error", message=message or "")
    return response_object(
        session_id=session_id,
        turn_id=trace.turn_id,
        created_at=int(trace.started_at.timestamp()),
        model=trace.model,
        settings=settings_of_trace(trace),
        status=status,
        output=[]
        if status in ("failed", "in_progress")
        else output_items(trace.turn_id, output, calls),
        usage=trace.usage if status != "in_progress" else None,
        finish_reason=trace.finish_reason,
        error=error,
    )


def input_items(turn_id: str, messages: Sequence[ChatMessage]) -> list[InputItem]:
    """The messages a turn added, as input items (oldest first)."""
    items: list[InputItem] = []
    for i, m in enumerate(messages):
        item_id = f"msg_{turn_id}_in{i}"
        if m.role == "tool":
            items.append(
                FunctionCallOutputItem(
                    id=f"fco_{turn_id}_in{i}",
                    call_id=m.tool_call_id or "",
                    output=m.content,
                    status="completed",
                )
            )
            continue
        if m.role == "assistant":
            if m.content or not m.tool_calls:
                text = OutputText(text=m.content, annotations=[])
                items.append(
                    InputMessageItem(
                        id=item_id, status="completed", role="assistant", content=[text]
                    )
                )
            items.extend(
                FunctionCallItem(
                    id=f"fc_{turn_id}_in{i}_{j}",
                    call_id=c.id,
                    name=c.function.name,
                    arguments=c.function.arguments,
                    status="completed",
                )
                for j, c in enumerate(m.tool_calls or ())
            )
            continue
        role = m.role if m.role in ("user", "system", "developer") else "user"
        items.append(
            InputMessageItem(
                id=item_id,
                status="completed",
                role=role,  # type: ignore[arg-type]
                content=[InputTextOut(text=m.content)],
            )
        )
    return items
