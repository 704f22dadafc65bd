"""OpenAI's Responses API, answers: the response object, its output items, the input
items of a turn and the typed server-sent events of a streamed response, as types (what
the handlers encode and /openapi.json describes; shapes as in the openai SDK's
openai/types/responses/)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "RESPONSE_EVENTS",
    "ContentPartAdded",
    "ContentPartDone",
    "FunctionCallArgumentsDelta",
    "FunctionCallArgumentsDone",
    "FunctionCallItem",
    "FunctionCallOutputItem",
    "IncompleteDetails",
    "InputItem",
    "InputItemList",
    "InputMessageItem",
    "InputTextOut",
    "OutputItem",
    "OutputItemAdded",
    "OutputItemDone",
    "OutputMessage",
    "OutputText",
    "OutputTextDelta",
    "OutputTextDone",
    "ResponseCompleted",
    "ResponseCreated",
    "ResponseDeletedObject",
    "ResponseError",
    "ResponseEvent",
    "ResponseFailed",
    "ResponseInProgress",
    "ResponseIncomplete",
    "ResponseObject",
    "ResponseUsage",
]

ItemStatus = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = Literal["completed", "failed", "in_progress", "cancelled", "incomplete"]


class OutputText(msgspec.Struct, tag="output_text", tag_field="type", kw_only=True):
    text: str
    annotations: list[dict[str, Any]]


class OutputMessage(msgspec.Struct, tag="message", tag_field="type", kw_only=True):
    id: str
    status: ItemStatus
    role: Literal["assistant"]
    content: list[OutputText]


class FunctionCallItem(msgspec.Struct, tag="function_call", tag_field="type", kw_only=True):
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = OutputMessage | FunctionCallItem


class InputTextOut(msgspec.Struct, tag="input_text", tag_field="type", kw_only=True):
    text: str


class InputMessageItem(msgspec.Struct, tag="message", tag_field="type", kw_only=True):
    """A message the turn added: the client's (input_text) or, resent, an assistant's."""

    id: str
    status: ItemStatus
    role: Literal["user", "system", "developer", "assistant"]
    content: list[InputTextOut | OutputText]


class FunctionCallOutputItem(
    msgspec.Struct, tag="function_call_output", tag_field="type", kw_only=True
):
    id: str
    call_id: str
    output: str
    status: ItemStatus


InputItem = InputMessageItem | FunctionCallItem | FunctionCallOutputItem


class InputItemList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[InputItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseDeletedObject(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["response"]
    deleted: bool


class InputTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int


class OutputTokensDetails(msgspec.Struct, kw_only=True):
    reasoning_tokens: int


class ResponseUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(msgspec.Struct, kw_only=True):
    code: str
    message: str


class IncompleteDetails(msgspec.Struct, kw_only=True):
    reason: Literal["max_output_tokens", "content_filter"]


class ConversationRef(msgspec.Struct, kw_only=True):
    id: str


class ResponseObject(msgspec.Struct, kw_only=True):
    """A response: one turn of a session. `session_id` is Veil's own field."""

    id: str
    object: Literal["response"]
    created_at: int
    status: ResponseStatus
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str]
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    conversation: ConversationRef | None
    store: bool
    temperature: float | None
    top_p: float | None
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    usage: ResponseUsage | None
    user: str | None
    session_id: str


class ResponseCreated(msgspec.Struct, tag="response.created", tag_field="type", kw_only=True):
    response: ResponseObject
    sequence_number: int


class ResponseInProgress(
    msgspec.Struct, tag="response.in_progress", tag_field="type", kw_only=True
):
    response: ResponseObject
    sequence_number: int


class ResponseCompleted(msgspec.Struct, tag="response.completed", tag_field="type", kw_only=True):
    response: ResponseObject
    sequence_number: int


class ResponseIncomplete(msgspec.Struct, tag="response.incomplete", tag_field="type", kw_only=True):
    response: ResponseObject
    sequence_number: int


class ResponseFailed(msgspec.Struct, tag="response.failed", tag_field="type", kw_only=True):
    response: ResponseObject
    sequence_number: int


class OutputItemAdded(
    msgspec.Struct, tag="response.output_item.added", tag_field="type", kw_only=True
):
    output_index: int
    item: OutputItem
    sequence_number: int


class OutputItemDone(
    msgspec.Struct, tag="response.output_item.done", tag_field="type", kw_only=True
):
    output_index: int
    item: OutputItem
    sequence_number: int


class ContentPartAdded(
    msgspec.Struct, tag="response.content_part.added", tag_field="type", kw_only=True
):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText
    sequence_number: int


class ContentPartDone(
    msgspec.Struct, tag="response.content_part.done", tag_field="type", kw_only=True
):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText
    sequence_number: int


class OutputTextDelta(
    msgspec.Struct, tag="response.output_text.delta", tag_field="type", kw_only=True
):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[dict[str, Any]]
    sequence_number: int


class OutputTextDone(
    msgspec.Struct, tag="response.output_text.done", tag_field="type", kw_only=True
):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[dict[str, Any]]
    sequence_number: int


class FunctionCallArgumentsDelta(
    msgspec.Struct, tag="response.function_call_arguments.delta", tag_field="type", kw_only=True
):
    item_id: str
    output_index: int
    delta: str
    sequence_number: int


class FunctionCallArgumentsDone(
    msgspec.Struct, tag="response.function_call_arguments.done", tag_field="type", kw_only=True
):
    item_id: str
    output_index: int
    name: str
    arguments: str
    sequence_number: int


ResponseEvent = (
    ResponseCreated
    | ResponseInProgress
    | ResponseCompleted
    | ResponseIncomplete
    | ResponseFailed
    | OutputItemAdded
    | OutputItemDone
    | ContentPartAdded
    | ContentPartDone
    | OutputTextDelta
    | OutputTextDone
    | FunctionCallArgumentsDelta
    | FunctionCallArgumentsDone
)

# Each event type on its own, as the API document lists the data a stream may carry.
RESPONSE_EVENTS: tuple[type[ResponseEvent], ...] = (
    ResponseCreated,
    ResponseInProgress,
    ResponseCompleted,
    ResponseIncomplete,
    ResponseFailed,
    OutputItemAdded,
    OutputItemDone,
    ContentPartAdded,
    ContentPartDone,
    OutputTextDelta,
    OutputTextDone,
    FunctionCallArgumentsDelta,
    FunctionCallArgumentsDone,
)
