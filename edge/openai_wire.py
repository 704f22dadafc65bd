"""OpenAI's chat wire format: request validation, response and chunk shapes, errors."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec

from bus.subjects import MAX_ID_LENGTH
from contracts.errors import ErrorInfo, error_type
from contracts.model import GENERATION_PARAMS
from contracts.session import ToolDelta
from edge.responses import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    ChunkDelta,
    CompletionUsage,
    ErrorBody,
    ErrorDetail,
    FunctionCallOut,
    FunctionDelta,
    ToolCallDelta,
    ToolCallOut,
)
from eventstore.events import ChatMessage, FunctionCall, ToolCall, Usage

__all__ = [
    "ApiError",
    "ChatRequest",
    "ChunkMeta",
    "chunk",
    "completion",
    "deeper_than",
    "error_body",
    "generation_params",
    "parse_chat_request",
    "to_chat_messages",
    "tool_calls_wire",
    "tool_delta_wire",
    "whole_call_delta",
]


class ApiError(Exception):
    """An error the client gets as `{"error": {...}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type(status)
        self.code = code
        self.param = param
        # Seconds to wait before another try: sent as the Retry-After header.
        self.retry_after = retry_after

    @classmethod
    def of(cls, info: ErrorInfo) -> ApiError:
        """The HTTP error for an error a reply carried: the one translation at the edge."""
        return cls(
            info.status,
            info.message,
            type=info.type,
            code=info.code,
            param=info.param,
            retry_after=info.retry_after,
        )

    def body(self) -> ErrorBody:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> ErrorBody:
    return ErrorBody(error=ErrorDetail(message=message, type=type, param=param, code=code))


MAX_USER_LENGTH = 256
# OpenAI's own limits, so a client that works there works here (and no request is
# unbounded beyond its byte size): messages, tools and tool calls per message, stop
# sequences, metadata pairs and their lengths.
MAX_MESSAGES = 2048
MAX_TOOLS = 128
MAX_TOOL_CALLS = 128
MAX_STOP = 4
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
# Free-form JSON (tool schemas, response_format, tool_choice) nests at most this deep.
MAX_JSON_DEPTH = 64


def _shown(description: str | None = None, **schema: Any) -> msgspec.Meta:
    """A bound that /openapi.json shows but the decoder does not enforce: `_check_limits`
    and `_check` do, with OpenAI's own error codes (array_above_max_length, empty_array).
    The schemathesis run (tests/test_api_fuzz.py) sends values past the bounds shown:
    a bound shown here and not enforced there is what it catches."""
    return msgspec.Meta(description=description, extra_json_schema=schema)


# Ranges the decoder enforces itself (a 400 naming the field, like any wrong type).
Sampling = Annotated[float, msgspec.Meta(ge=0, le=2)]
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]
Choices = Annotated[int, msgspec.Meta(ge=1, le=8)]
SessionIdField = Annotated[
    str,
    msgspec.Meta(
        description="Veil's own field: the session to continue (or to open under this name). "
        "The same as the X-Session-Id header or metadata.session_id; naming two different "
        "sessions is a 400. None of them (or empty): a new session, whose id the response "
        "carries.",
        examples=["sess_8d0f6b4e2c"],
    ),
    _shown(pattern=f"^[A-Za-z0-9_-]{{0,{MAX_ID_LENGTH}}}$"),
]


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ImageUrlPart(msgspec.Struct, tag="image_url", tag_field="type"):
    image_url: dict[str, Any]


class InputAudioPart(msgspec.Struct, tag="input_audio", tag_field="type"):
    input_audio: dict[str, Any]


class FilePart(msgspec.Struct, tag="file", tag_field="type"):
    file: dict[str, Any]


class RefusalPart(msgspec.Struct, tag="refusal", tag_field="type"):
    refusal: str


ContentPart = TextPart | ImageUrlPart | InputAudioPart | FilePart | RefusalPart


class FunctionIn(msgspec.Struct, kw_only=True):
    name: str
    arguments: str


class ToolCallIn(msgspec.Struct, kw_only=True):
    id: str
    function: FunctionIn
    type: Literal["function"] = "function"


class FunctionDef(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(msgspec.Struct, kw_only=True):
    function: FunctionDef
    type: Literal["function"] = "function"


class MessageIn(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCallIn], _shown(maxItems=MAX_TOOL_CALLS)] | None = None
    tool_call_id: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatRequest(msgspec.Struct, kw_only=True):
    """OpenAI's chat completion request, plus `session_id`. Send only the new messages
    of a session (the model gets the whole conversation), or resend all of it."""

    model: Annotated[str, msgspec.Meta(description="A public model name.", examples=["veil"])]
    messages: Annotated[list[MessageIn], _shown(minItems=1, maxItems=MAX_MESSAGES)]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Sampling | None = None
    top_p: Sampling | None = None
    max_tokens: AtLeastOne | None = None
    max_completion_tokens: AtLeastOne | None = None
    stop: str | Annotated[list[str], _shown(maxItems=MAX_STOP)] | None = None
    seed: int | None = None
    n: Choices | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: dict[str, Any] | None = None
    user: (
        Annotated[
            str,
            _shown(
                "The end user; their other sessions' memories may be recalled.",
                maxLength=MAX_USER_LENGTH,
            ),
        ]
        | None
    ) = None
    metadata: (
        Annotated[
            dict[str, Annotated[str, _shown(maxLength=MAX_METADATA_VALUE)]],
            _shown(
                "Routing metadata; also `session_id` and `user_id`, as the fields above.",
                maxProperties=MAX_METADATA_PAIRS,
                propertyNames={"maxLength": MAX_METADATA_KEY},
            ),
        ]
        | None
    ) = None
    # Kept as sent, so the upstream gets them unchanged; checked against ToolDef.
    tools: (
        Annotated[
            list[dict[str, Any]],
            _shown(
                'Each {"type": "function", "function": {"name", "description", '
                '"parameters", "strict"}}.',
                maxItems=MAX_TOOLS,
            ),
        ]
        | None
    ) = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: (
        Annotated[list[dict[str, Any]], _shown("Not supported: use tools.", maxItems=0)] | None
    ) = None
    # Veil's own field (DESIGN.md, session id contract).
    session_id: SessionIdField | None = None


_decoder = msgspec.json.Decoder(ChatRequest)
_PATH = re.compile(r"at `\$\.?(?P<path>[^`]*)`")


def _param_of(message: str) -> str | None:
    match = _PATH.search(message)
    return match.group("path") or None if match else None


def parse_chat_request(body: bytes) -> ChatRequest:
    """Decode and check a chat completion request; raises ApiError (400)."""
    try:
        request = _decoder.decode(body)
    except msgspec.ValidationError as error:
        text = str(error)
        raise ApiError(
            400, f"Invalid request: {text}", param=_param_of(text), code="invalid_value"
        ) from None
    except msgspec.DecodeError:
        raise ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise _too_deep(None) from None
    _check_limits(request)
    _check(request)
    return request


def _too_long(param: str, limit: int, got: int) -> ApiError:
    return ApiError(
        400,
        f"Invalid '{param}': array too long. Expected an array with maximum length {limit}, "
        f"but got an array with length {got} instead.",
        param=param,
        code="array_above_max_length",
    )


def _too_deep(param: str | None) -> ApiError:
    where = f"'{param}'" if param else "The JSON body"
    return ApiError(
        400,
        f"{where} nests deeper than {MAX_JSON_DEPTH} levels.",
        param=param,
        code="invalid_value",
    )


def deeper_than(value: Any, limit: int) -> bool:
    """Whether lists and objects nest more than `limit` levels (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        )
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _check_limits(request: ChatRequest) -> None:
    if len(request.messages) > MAX_MESSAGES:
        raise _too_long("messages", MAX_MESSAGES, len(request.messages))
    for i, message in enumerate(request.messages):
        if message.tool_calls and len(message.tool_calls) > MAX_TOOL_CALLS:
            raise _too_long(f"messages[{i}].tool_calls", MAX_TOOL_CALLS, len(message.tool_calls))
    if request.tools and len(request.tools) > MAX_TOOLS:
        raise _too_long("tools", MAX_TOOLS, len(request.tools))
    if isinstance(request.stop, list) and len(request.stop) > MAX_STOP:
        raise _too_long("stop", MAX_STOP, len(request.stop))
    for name in ("tools", "tool_choice", "response_format"):
        if deeper_than(getattr(request, name), MAX_JSON_DEPTH):
            raise _too_deep(name)
    metadata = request.metadata or {}
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ApiError(
            400,
            f"Invalid 'metadata': at most {MAX_METADATA_PAIRS} key-value pairs.",
            param="metadata",
            code="invalid_value",
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise ApiError(
                400,
                f"Invalid 'metadata': keys may have up to {MAX_METADATA_KEY} characters and "
                f"values up to {MAX_METADATA_VALUE}.",
                param=f"metadata.{key[:MAX_METADATA_KEY]}",
                code="invalid_value",
            )


def _check(request: ChatRequest) -> None:
    if not request.model:
        raise ApiError(
            400,
            "You must provide a model parameter.",
            param="model",
            code="missing_required_parameter",
        )
    if not request.messages:
        raise ApiError(
            400,
            "'messages' must contain at least one message.",
            param="messages",
            code="empty_array",
        )
    if request.tools is not None:
        try:
            msgspec.convert(request.tools, list[ToolDef])
        except msgspec.ValidationError as error:
            text = str(error)
            path = _param_of(text)
            raise ApiError(
                400,
                f"Invalid tools: {text}",
                param=f"tools{path}" if path else "tools",
                code="invalid_value",
            ) from None
    if request.functions:
        raise ApiError(
            400,
            "'functions' is deprecated and not supported; use 'tools'.",
            param="functions",
            code="unsupported_parameter",
        )
    for i, message in enumerate(request.messages):
        if message.role == "function":
            raise ApiError(
                400,
                "Messages with role 'function' are deprecated and not supported; use role 'tool'.",
                param=f"messages[{i}].role",
                code="unsupported_value",
            )
        if message.role == "tool" and not message.tool_call_id:
            raise ApiError(
                400,
                f"messages[{i}]: a 'tool' message needs the 'tool_call_id' it answers.",
                param=f"messages[{i}].tool_call_id",
                code="missing_required_parameter",
            )
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if not isinstance(part, TextPart | RefusalPart):
                    kind = type(part).__struct_config__.tag
                    raise ApiError(
                        400,
                        f"Content parts of type '{kind}' are not supported; send text.",
                        param=f"messages[{i}].content[{j}].type",
                        code="unsupported_value",
                    )
        elif message.content is None and not (message.role == "assistant" and message.tool_calls):
            raise ApiError(
                400,
                f"messages[{i}].content must be a string or a list of content parts.",
                param=f"messages[{i}].content",
                code="invalid_type",
            )
    user = request.user or (request.metadata or {}).get("user_id")
    if user is not None and not 0 < len(user) <= MAX_USER_LENGTH:
        raise ApiError(
            400,
            f"The user id must be 1-{MAX_USER_LENGTH} characters.",
            param="user",
            code="invalid_value",
        )


def _text(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(
        p.text if isinstance(p, TextPart) else p.refusal
        for p in content
        if isinstance(p, TextPart | RefusalPart)
    )


def to_chat_messages(request: ChatRequest) -> list[ChatMessage]:
    return [
        ChatMessage(
            role=m.role,
            content=_text(m.content),
            name=m.name,
            tool_calls=tuple(
                ToolCall(
                    id=c.id,
                    function=FunctionCall(name=c.function.name, arguments=c.function.arguments),
                )
                for c in m.tool_calls
            )
            if m.tool_calls
            else None,
            tool_call_id=m.tool_call_id,
        )
        for m in request.messages
    ]


PARAMS = GENERATION_PARAMS


def generation_params(request: ChatRequest) -> dict[str, Any]:
    """The generation parameters the client set, and only those."""
    params: dict[str, Any] = {}
    for name in PARAMS:
        value = getattr(request, name)
        if value is not None:
            params[name] = value
    return params


def _usage(usage: Usage) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def tool_calls_wire(calls: Sequence[ToolCall]) -> list[ToolCallOut]:
    return [
        ToolCallOut(
            id=c.id,
            type="function",
            function=FunctionCallOut(name=c.function.name, arguments=c.function.arguments),
        )
        for c in calls
    ]


def tool_delta_wire(piece: ToolDelta) -> ToolCallDelta:
    """A ToolDelta as one element of OpenAI's `delta.tool_calls`: the id, type and name
    come with a call's first piece only."""
    return ToolCallDelta(
        index=piece.index,
        id=msgspec.UNSET if piece.id is None else piece.id,
        type=msgspec.UNSET if piece.id is None else "function",
        function=FunctionDelta(
            name=msgspec.UNSET if piece.name is None else piece.name, arguments=piece.arguments
        ),
    )


def whole_call_delta(index: int, call: ToolCall) -> ToolCallDelta:
    """A tool call whose pieces never streamed, as one `delta.tool_calls` element."""
    return ToolCallDelta(
        index=index,
        id=call.id,
        type="function",
        function=FunctionDelta(name=call.function.name, arguments=call.function.arguments),
    )


def completion(
    *,
    id: str,
    created: int,
    model: str,
    content: str,
    finish_reason: str,
    usage: Usage,
    session_id: str,
    tool_calls: Sequence[ToolCall] = (),
    alternatives: Sequence[str] = (),
) -> ChatCompletion:
    """A `chat.completion` object as OpenAI returns it, plus `session_id`.

    With n > 1, the session continues from the first choice; the others are
    the alternatives.
    """
    message = AssistantMessage(role="assistant", content=content, refusal=None)
    if tool_calls:
        message = AssistantMessage(
            role="assistant",
            content=content or None,
            refusal=None,
            tool_calls=tool_calls_wire(tool_calls),
        )
    choices = [Choice(index=0, message=message, logprobs=None, finish_reason=finish_reason)]
    choices += [
        Choice(
            index=i,
            message=AssistantMessage(role="assistant", content=text, refusal=None),
            logprobs=None,
            finish_reason=finish_reason,
        )
        for i, text in enumerate(alternatives, start=1)
    ]
    return ChatCompletion(
        id=id,
        object="chat.completion",
        created=created,
        model=model,
        choices=choices,
        usage=_usage(usage),
        session_id=session_id,
    )


class ChunkMeta(msgspec.Struct, frozen=True, kw_only=True):
    """What every chunk of one streamed completion repeats."""

    id: str
    created: int
    model: str
    session_id: str


def chunk(
    meta: ChunkMeta,
    *,
    delta: ChunkDelta | None = None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
    include_usage: bool = False,
    index: int = 0,
) -> ChatCompletionChunk:
    """A `chat.completion.chunk`; with usage, the final usage-only chunk (empty choices)."""
    if usage is not None:
        choices: list[ChunkChoice] = []
    else:
        choices = [
            ChunkChoice(
                index=index,
                delta=delta or ChunkDelta(),
                logprobs=None,
                finish_reason=finish_reason,
            )
        ]
    return ChatCompletionChunk(
        id=meta.id,
        object="chat.completion.chunk",
        created=meta.created,
        model=meta.model,
        session_id=meta.session_id,
        choices=choices,
        usage=_usage(usage) if usage is not None else None if include_usage else msgspec.UNSET,
    )
