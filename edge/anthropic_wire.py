"""Anthropic's Messages API, requests: decoded, checked, and translated into the chat
request every door runs (edge/chat.py), so a turn is the same turn whichever door it
came through. Also the count_tokens estimate.

What does not translate is refused with a 400 that says so, never dropped in silence:
images and documents (Veil's engines take text), `top_k` (no engine takes it), an
assistant message last (a prefill: the reply would not continue it). Extended thinking
and other fields Veil does not know are ignored, as the chat door ignores unknown fields.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from edge.limit_window import estimate_tokens
from edge.openai_wire import (
    MAX_JSON_DEPTH,
    ApiError,
    ChatRequest,
    FunctionIn,
    MessageIn,
    ToolCallIn,
    deeper_than,
)

__all__ = [
    "CountTokensRequest",
    "MessagesRequest",
    "count_tokens",
    "parse_count_request",
    "parse_messages_request",
    "to_chat_request",
    "tool_arguments",
    "tool_input",
]

# Bounds on what one request may hold (its byte size is bounded by the server already):
# messages as the chat door allows, content blocks per message (and per tool result and
# system prompt), tools, and stop sequences as many as every engine takes (OpenAI's 4).
MAX_MESSAGES = 2048
MAX_BLOCKS = 256
MAX_TOOLS = 128
MAX_STOP = 4
MAX_OUTPUT_TOKENS = 1_000_000
MAX_USER_LENGTH = 256
MAX_ID_LENGTH = 256
# Text blocks of one message become one message for the engines, joined as paragraphs.
BLOCK_JOINER = "\n\n"

Unit = Annotated[float, Meta(ge=0, le=1)]
ToolName = Annotated[
    str, Meta(pattern="^[A-Za-z0-9_-]{1,128}$", description="1-128 of A-Za-z0-9_-.")
]
BlockId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH)]


class TextBlock(msgspec.Struct, tag="text", tag_field="type", kw_only=True):
    text: str


class ImageBlock(msgspec.Struct, tag="image", tag_field="type", kw_only=True):
    """Refused with a 400: Veil's engines take text."""

    source: dict[str, Any]


class DocumentBlock(msgspec.Struct, tag="document", tag_field="type", kw_only=True):
    """Refused with a 400: Veil's engines take text."""

    source: dict[str, Any]


class ToolUseBlock(msgspec.Struct, tag="tool_use", tag_field="type", kw_only=True):
    id: BlockId
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    input: dict[str, Any]


ToolResultPart = TextBlock | ImageBlock | DocumentBlock


class ToolResultBlock(msgspec.Struct, tag="tool_result", tag_field="type", kw_only=True):
    tool_use_id: BlockId
    content: str | Annotated[list[ToolResultPart], Meta(max_length=MAX_BLOCKS)] | None = None
    is_error: bool | None = None


class ThinkingBlock(msgspec.Struct, tag="thinking", tag_field="type", kw_only=True):
    """Resent by clients of thinking models; Veil's models never made it: left out."""

    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(msgspec.Struct, tag="redacted_thinking", tag_field="type"):
    data: str


Block = (
    TextBlock
    | ImageBlock
    | DocumentBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock
)


class MessageParam(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[Block], Meta(max_length=MAX_BLOCKS)]


class ToolParam(msgspec.Struct, kw_only=True):
    """A client tool (`custom`); Anthropic's server tools are not offered."""

    name: ToolName
    input_schema: dict[str, Any]
    description: str | None = None
    type: Literal["custom"] | None = None


class ToolChoiceAuto(msgspec.Struct, tag="auto", tag_field="type", kw_only=True):
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(msgspec.Struct, tag="any", tag_field="type", kw_only=True):
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(msgspec.Struct, tag="tool", tag_field="type", kw_only=True):
    name: ToolName
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(msgspec.Struct, tag="none", tag_field="type", kw_only=True):
    pass


ToolChoice = ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone


class Metadata(msgspec.Struct, kw_only=True):
    user_id: (
        Annotated[
            str,
            Meta(
                min_length=1,
                max_length=MAX_USER_LENGTH,
                description="The end user: their other sessions' memories may be recalled.",
            ),
        ]
        | None
    ) = None


System = str | Annotated[list[TextBlock], Meta(max_length=MAX_BLOCKS)]
Messages = Annotated[list[MessageParam], Meta(min_length=1, max_length=MAX_MESSAGES)]
Tools = Annotated[list[ToolParam], Meta(max_length=MAX_TOOLS)]


class MessagesRequest(msgspec.Struct, kw_only=True):
    """Anthropic's Messages request. Resend the whole conversation (it is recognised as
    its session), or name the session with X-Session-Id and send only what is new."""

    model: Annotated[str, Meta(description="A public model name.", examples=["veil"])]
    messages: Messages
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_OUTPUT_TOKENS)]
    system: System | None = None
    stop_sequences: (
        Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=MAX_STOP)] | None
    ) = None
    temperature: Unit | None = None
    top_p: Unit | None = None
    top_k: (
        Annotated[int, Meta(description="Not supported (no engine takes it): refused.")] | None
    ) = None
    metadata: Metadata | None = None
    stream: bool | None = False
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None


class CountTokensRequest(msgspec.Struct, kw_only=True):
    """What count_tokens counts: a Messages request without its generation settings."""

    model: Annotated[str, Meta(description="A public model name.", examples=["veil"])]
    messages: Messages
    system: System | None = None
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None


_messages_decoder = msgspec.json.Decoder(MessagesRequest)
_count_decoder = msgspec.json.Decoder(CountTokensRequest)
_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def _anthropic_path(path: str) -> str:
    """msgspec's `$.messages[0].content` as Anthropic writes it: `messages.0.content`."""
    return re.sub(r"\[(\d+)\]", r".\1", path).lstrip(".")


def _invalid(error: msgspec.ValidationError) -> ApiError:
    text = str(error)
    match = _PATH.search(text)
    if match is None:
        return ApiError(400, f"Invalid request: {text}", code="invalid_value")
    path = _anthropic_path(match.group("path"))
    what = text[: match.start()]
    return ApiError(
        400, f"{path}: {what}" if path else what, param=path or None, code="invalid_value"
    )


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as error:
        raise _invalid(error) from None
    except msgspec.DecodeError:
        raise ApiError(
            400,
            "There was an issue with your request body: it is not valid JSON.",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise ApiError(400, "The JSON body nests too deeply.", code="invalid_value") from None


def parse_messages_request(body: bytes) -> MessagesRequest:
    """Decode and check a Messages request; raises ApiError (400)."""
    request: MessagesRequest = _decode(_messages_decoder, body)
    if request.top_k is not None:
        raise ApiError(
            400,
            "top_k: not supported; no engine behind this server takes it (use temperature "
            "or top_p).",
            param="top_k",
            code="unsupported_parameter",
        )
    _check_messages(request.messages)
    _check_tools(request.tools)
    return request


def parse_count_request(body: bytes) -> CountTokensRequest:
    """Decode and check a count_tokens request; raises ApiError (400)."""
    request: CountTokensRequest = _decode(_count_decoder, body)
    _check_messages(request.messages)
    _check_tools(request.tools)
    return request


def _refuse(where: str, why: str) -> ApiError:
    return ApiError(400, f"{where}: {why}", param=where, code="invalid_value")


def _check_messages(messages: list[MessageParam]) -> None:
    for i, message in enumerate(messages):
        if isinstance(message.content, str):
            continue
        for j, block in enumerate(message.content):
            where = f"messages.{i}.content.{j}"
            if isinstance(block, ImageBlock | DocumentBlock):
                raise _not_text(where, block)
            if isinstance(block, ToolUseBlock):
                if message.role != "assistant":
                    raise _refuse(where, "tool_use blocks belong in assistant messages.")
                if deeper_than(block.input, MAX_JSON_DEPTH):
                    raise _refuse(f"{where}.input", f"nests deeper than {MAX_JSON_DEPTH} levels.")
            elif isinstance(block, ToolResultBlock):
                if message.role != "user":
                    raise _refuse(where, "tool_result blocks belong in user messages.")
                for k, part in enumerate(block.content if isinstance(block.content, list) else ()):
                    if isinstance(part, ImageBlock | DocumentBlock):
                        raise _not_text(f"{where}.content.{k}", part)
    if messages[-1].role != "user":
        raise _refuse(
            f"messages.{len(messages) - 1}.role",
            "the last message must be the user's (continuing an assistant message, a "
            "prefill, is not supported).",
        )


def _not_text(where: str, block: ImageBlock | DocumentBlock) -> ApiError:
    kind = "image" if isinstance(block, ImageBlock) else "document"
    return ApiError(
        400,
        f"{where}: {kind} blocks are not supported; this server's models read text only.",
        param=where,
        code="unsupported_value",
    )


def _check_tools(tools: list[ToolParam] | None) -> None:
    for i, tool in enumerate(tools or ()):
        if deeper_than(tool.input_schema, MAX_JSON_DEPTH):
            raise _refuse(f"tools.{i}.input_schema", f"nests deeper than {MAX_JSON_DEPTH} levels.")


def _text(blocks: list[Any]) -> str:
    return BLOCK_JOINER.join(b.text for b in blocks if isinstance(b, TextBlock))


def tool_arguments(value: dict[str, Any]) -> str:
    """A tool_use block's input as the engines carry a call's arguments: compact JSON."""
    return msgspec.json.encode(value).decode()


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as a tool_use block's input, which Anthropic makes an object:
    none is `{}`, and what is not a JSON object (a model's broken JSON) is kept whole."""
    if not arguments.strip():
        return {}
    try:
        value = msgspec.json.decode(arguments)
    except (msgspec.DecodeError, RecursionError):
        value = None
    return value if isinstance(value, dict) else {"_unparsed": arguments}


def _tool_result(block: ToolResultBlock) -> MessageIn:
    content = block.content
    text = content if isinstance(content, str) else _text(content or [])
    if block.is_error:
        # The engines have no error flag on a tool's answer: the text says it.
        text = f"Error: {text}"
    return MessageIn(role="tool", content=text, tool_call_id=block.tool_use_id)


def _chat_messages(message: MessageParam) -> list[MessageIn]:
    """One Anthropic message as chat messages: a user's tool results come first (each a
    `tool` message, as the engines expect them right after the calls), then its text."""
    content = message.content
    if isinstance(content, str):
        return [MessageIn(role=message.role, content=content)]
    if message.role == "assistant":
        calls = [
            ToolCallIn(id=b.id, function=FunctionIn(name=b.name, arguments=tool_arguments(b.input)))
            for b in content
            if isinstance(b, ToolUseBlock)
        ]
        text = _text(content)
        if calls:
            return [MessageIn(role="assistant", content=text or None, tool_calls=calls)]
        return [MessageIn(role="assistant", content=text)]
    out = [_tool_result(b) for b in content if isinstance(b, ToolResultBlock)]
    texts = [b for b in content if isinstance(b, TextBlock)]
    if texts or not out:
        out.append(MessageIn(role="user", content=_text(texts)))
    return out


def _tools(tools: list[ToolParam]) -> list[dict[str, Any]]:
    """Anthropic's tools as OpenAI function tools, the form every engine takes."""
    out = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description is not None:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    match choice:
        case ToolChoiceAuto():
            return "auto"
        case ToolChoiceAny():
            return "required"
        case ToolChoiceNone():
            return "none"
        case ToolChoiceTool():
            return {"type": "function", "function": {"name": choice.name}}


def to_chat_request(request: MessagesRequest) -> ChatRequest:
    """The chat request the chat door would have made of this conversation."""
    messages: list[MessageIn] = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else _text(request.system)
        messages.append(MessageIn(role="system", content=system))
    for message in request.messages:
        messages.extend(_chat_messages(message))
    choice = request.tool_choice
    tools = request.tools or None
    parallel = None
    if choice is not None and not isinstance(choice, ToolChoiceNone):
        parallel = False if choice.disable_parallel_tool_use else None
    return ChatRequest(
        model=request.model,
        messages=messages,
        stream=bool(request.stream),
        max_tokens=request.max_tokens,
        stop=list(request.stop_sequences) if request.stop_sequences else None,
        temperature=request.temperature,
        top_p=request.top_p,
        user=request.metadata.user_id if request.metadata else None,
        tools=_tools(tools) if tools else None,
        # A choice without tools means nothing, and OpenAI-compatible upstreams refuse it.
        tool_choice=_tool_choice(choice) if choice is not None and tools else None,
        parallel_tool_calls=parallel if tools else None,
    )


def _block_chars(block: Any) -> int:
    if isinstance(block, TextBlock):
        return len(block.text)
    if isinstance(block, ToolUseBlock):
        return len(block.name) + len(tool_arguments(block.input))
    if isinstance(block, ToolResultBlock):
        content = block.content
        return len(content) if isinstance(content, str) else len(_text(content or []))
    return 0


def count_tokens(request: CountTokensRequest) -> int:
    """An estimate of the request's input tokens: its characters over four, the rule the
    rate limits count by (edge/limit_window.py); not any model's own tokenizer."""
    chars = 0
    system = request.system
    if system is not None:
        chars += len(system) if isinstance(system, str) else len(_text(system))
    for message in request.messages:
        content = message.content
        if isinstance(content, str):
            chars += len(content)
        else:
            chars += sum(_block_chars(b) for b in content)
    for tool in request.tools or ():
        chars += len(tool.name) + len(tool.description or "")
        chars += len(tool_arguments(tool.input_schema))
    return estimate_tokens(chars, None)
