"""OpenAI's Responses API, requests: decoded, checked, and translated into the chat
request every door runs (edge/chat.py); and response ids.

A response is one turn of a session. Its id says which: `resp_` and the session id and
turn id, base64url-encoded (no padding), so any gateway finds it in the session's log
with no index of its own; the session is looked up under the caller's tenant, so another
tenant's response id finds nothing, exactly as a made-up one.

Input items: messages (`input_text`/`output_text` content, or a string), the client's
`function_call` items resent and its `function_call_output` items. What does not
translate is refused with a 400 that says so: images, files and other content types,
tools other than functions, `background`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from bus.subjects import MAX_ID_LENGTH, is_valid_id
from edge.openai_wire import (
    MAX_JSON_DEPTH,
    MAX_METADATA_KEY,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE,
    MAX_TOOLS,
    MAX_USER_LENGTH,
    ApiError,
    ChatRequest,
    FunctionIn,
    MessageIn,
    ToolCallIn,
    deeper_than,
)

__all__ = [
    "MAX_ITEMS",
    "ResponseRef",
    "ResponsesRequest",
    "conversation_id",
    "parse_response_id",
    "parse_responses_request",
    "response_id",
    "to_chat_request",
]

# Input items per request (as many as messages on the chat door), content parts per message.
MAX_ITEMS = 2048
MAX_PARTS = 256
MAX_OUTPUT_TOKENS = 1_000_000
# A response id: `resp_` and base64 of a session id and a turn id.
MAX_RESPONSE_ID = 5 + 4 * (2 * MAX_ID_LENGTH + 1) // 3 + 4

CallId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH)]


class ResponseRef(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    turn_id: str


def response_id(session_id: str, turn_id: str) -> str:
    raw = f"{session_id}.{turn_id}".encode()
    return "resp_" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_response_id(value: str) -> ResponseRef | None:
    """The session and turn a response id names, or None when it names none."""
    if not value.startswith("resp_") or len(value) > MAX_RESPONSE_ID:
        return None
    body = value.removeprefix("resp_")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
    except (binascii.Error, ValueError):
        return None
    session_id, _, turn_id = raw.partition(".")
    if not (is_valid_id(session_id) and is_valid_id(turn_id)):
        return None
    return ResponseRef(session_id=session_id, turn_id=turn_id)


class InputTextPart(msgspec.Struct, tag="input_text", tag_field="type", kw_only=True):
    text: str


class OutputTextPart(msgspec.Struct, tag="output_text", tag_field="type", kw_only=True):
    text: str


class RefusalPart(msgspec.Struct, tag="refusal", tag_field="type", kw_only=True):
    refusal: str


Part = InputTextPart | OutputTextPart | RefusalPart


class MessageItem(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[Part], Meta(max_length=MAX_PARTS)]
    type: Literal["message"] = "message"


class FunctionCallIn(msgspec.Struct, kw_only=True):
    type: Literal["function_call"]
    call_id: CallId
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    arguments: str


class FunctionCallOutputIn(msgspec.Struct, kw_only=True):
    type: Literal["function_call_output"]
    call_id: CallId
    output: str | Annotated[list[InputTextPart], Meta(max_length=MAX_PARTS)]


class FunctionTool(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    name: Annotated[str, Meta(pattern="^[A-Za-z0-9_-]{1,128}$")]
    parameters: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class ConversationParam(msgspec.Struct, kw_only=True):
    id: str


Metadata = Annotated[
    dict[
        Annotated[str, Meta(max_length=MAX_METADATA_KEY)],
        Annotated[str, Meta(max_length=MAX_METADATA_VALUE)],
    ],
    Meta(max_length=MAX_METADATA_PAIRS),
]


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """OpenAI's create-response request. Continue a session with `previous_response_id`
    (the last response of its session) or `conversation` (a session id), or resend the
    whole conversation (it is recognised as its session)."""

    model: Annotated[str, Meta(min_length=1, description="A public model name.")]
    input: (
        str
        | Annotated[
            list[dict[str, Any]],
            Meta(
                min_length=1,
                max_length=MAX_ITEMS,
                description="Messages (input_text), function_call and function_call_output items.",
            ),
        ]
    )
    instructions: str | None = None
    previous_response_id: (
        Annotated[str, Meta(max_length=MAX_RESPONSE_ID, description="Continue its session.")] | None
    ) = None
    conversation: (
        Annotated[str, Meta(description="A session id: continue it, or open it.")]
        | ConversationParam
        | None
    ) = None
    store: bool = True
    stream: bool = False
    tools: Annotated[list[dict[str, Any]], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[int, Meta(ge=1, le=MAX_OUTPUT_TOKENS)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    metadata: Metadata | None = None
    user: Annotated[str, Meta(min_length=1, max_length=MAX_USER_LENGTH)] | None = None
    background: bool | None = None


_decoder = msgspec.json.Decoder(ResponsesRequest)


def _invalid(where: str, error: msgspec.ValidationError) -> ApiError:
    text = str(error)
    path = ""
    if " - at `$" in text:
        text, _, rest = text.partition(" - at `$")
        path = rest.rstrip("`")
    param = f"{where}{path}" if where else path.lstrip(".") or None
    return ApiError(
        400, f"Invalid '{param}': {text}" if param else text, param=param, code="invalid_value"
    )


def _refuse(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"Invalid '{param}': {message}", param=param, code=code)


def parse_responses_request(body: bytes) -> ResponsesRequest:
    """Decode and check a create-response request; raises ApiError (400)."""
    try:
        request = _decoder.decode(body)
    except msgspec.ValidationError as error:
        raise _invalid("", error) from None
    except msgspec.DecodeError:
        raise ApiError(
            400, "We could not parse the JSON body of your request.", code="invalid_json"
        ) from None
    except RecursionError:
        raise ApiError(400, "The JSON body nests too deeply.", code="invalid_value") from None
    if request.previous_response_id is not None and request.conversation is not None:
        raise ApiError(
            400,
            "Give 'previous_response_id' or 'conversation', not both.",
            param="previous_response_id",
            code="mutually_exclusive_parameters",
        )
    if request.background:
        raise _refuse("background", "background responses are not supported.", "unsupported_value")
    for name in ("input", "tools", "tool_choice"):
        if deeper_than(getattr(request, name), MAX_JSON_DEPTH):
            raise _refuse(name, f"nests deeper than {MAX_JSON_DEPTH} levels.")
    return request


def conversation_id(request: ResponsesRequest) -> str | None:
    """The session the `conversation` field names (checked), if any."""
    conversation = request.conversation
    if conversation is None:
        return None
    value = conversation if isinstance(conversation, str) else conversation.id
    if not is_valid_id(value):
        raise _refuse(
            "conversation",
            f"use 1-{MAX_ID_LENGTH} characters from A-Z, a-z, 0-9, '_' and '-'.",
        )
    return value


def _text(content: str | Sequence[Part]) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.refusal if isinstance(p, RefusalPart) else p.text for p in content)


def _messages(items: str | list[dict[str, Any]]) -> list[MessageIn]:
    """Input items as chat messages: a function_call joins the assistant message before
    it (as the engines carry calls), each output becomes a `tool` message."""
    if isinstance(items, str):
        return [MessageIn(role="user", content=items)]
    out: list[MessageIn] = []
    for i, raw in enumerate(items):
        where = f"input[{i}]"
        kind = raw.get("type", "message")
        try:
            if kind == "message":
                message = msgspec.convert(raw, MessageItem)
                role = "system" if message.role == "developer" else message.role
                out.append(MessageIn(role=role, content=_text(message.content)))
            elif kind == "function_call":
                call = msgspec.convert(raw, FunctionCallIn)
                wire = ToolCallIn(
                    id=call.call_id, function=FunctionIn(name=call.name, arguments=call.arguments)
                )
                last = out[-1] if out else None
                if last is not None and last.role == "assistant":
                    last.tool_calls = [*(last.tool_calls or []), wire]
                else:
                    out.append(MessageIn(role="assistant", content=None, tool_calls=[wire]))
            elif kind == "function_call_output":
                result = msgspec.convert(raw, FunctionCallOutputIn)
                output = result.output if isinstance(result.output, str) else _text(result.output)
                out.append(MessageIn(role="tool", content=output, tool_call_id=result.call_id))
            else:
                raise _refuse(
                    f"{where}.type",
                    f"items of type '{str(kind)[:64]}' are not supported; send messages, "
                    "function_call and function_call_output items.",
                    "unsupported_value",
                )
        except msgspec.ValidationError as error:
            raise _invalid(where, error) from None
    return out


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Function tools as the chat door's (every engine takes them); no other kind."""
    out = []
    for i, raw in enumerate(tools):
        if raw.get("type") != "function":
            raise _refuse(
                f"tools[{i}].type",
                "only function tools are supported.",
                "unsupported_value",
            )
        try:
            tool = msgspec.convert(raw, FunctionTool)
        except msgspec.ValidationError as error:
            raise _invalid(f"tools[{i}]", error) from None
        function: dict[str, Any] = {"name": tool.name}
        for name in ("description", "parameters", "strict"):
            value = getattr(tool, name)
            if value is not None:
                function[name] = value
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice in ("auto", "none", "required"):
            return choice
    elif choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"][:128]}}
    raise _refuse(
        "tool_choice",
        "use 'auto', 'none', 'required' or {\"type\": \"function\", \"name\": ...}.",
        "unsupported_value",
    )


def to_chat_request(request: ResponsesRequest, session_id: str | None) -> ChatRequest:
    """The chat request the chat door would have made of this one."""
    messages: list[MessageIn] = []
    if request.instructions is not None:
        messages.append(MessageIn(role="system", content=request.instructions))
    messages.extend(_messages(request.input))
    tools = _tools(request.tools) if request.tools else None
    choice = _tool_choice(request.tool_choice) if request.tool_choice is not None else None
    return ChatRequest(
        model=request.model,
        messages=messages,
        stream=request.stream,
        max_tokens=request.max_output_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        user=request.user,
        metadata=request.metadata,
        tools=tools,
        # A choice without tools means nothing, and OpenAI-compatible upstreams refuse it.
        tool_choice=choice if tools else None,
        parallel_tool_calls=request.parallel_tool_calls if tools else None,
        session_id=session_id,
    )
