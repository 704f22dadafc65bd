"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API on Veil's
sessions.

A Messages request becomes the chat request the chat door would make of the same
conversation (edge/anthropic_wire.py) and runs the same turn (edge/chat.py: session,
idempotency, budgets, rate limits, the relay, metrics and traces); only the answer is
Anthropic's (edge/anthropic_answer.py, edge/anthropic_sse.py), errors included
(edge/anthropic_errors.py). A client that resends its whole conversation continues the
session that holds it (edge/history_index.py); X-Session-Id names one outright.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from contracts.session import StartTurn, TurnDone, TurnError
from edge.anthropic_answer import message_of
from edge.anthropic_responses import (
    AnthropicErrorBody,
    AnthropicMessage,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    MessageDelta,
    MessageStart,
    MessageStop,
    Ping,
    TokenCount,
)
from edge.anthropic_sse import stream_message
from edge.anthropic_wire import (
    CountTokensRequest,
    MessagesRequest,
    count_tokens,
    parse_count_request,
    parse_messages_request,
    to_chat_request,
)
from edge.auth import require_scope
from edge.chat import (
    SESSION_HEADER,
    TurnItem,
    check_model,
    command_id_for,
    read_body,
    run_chat_turn,
)
from edge.history_index import HISTORY, Conversation, HistoryIndex, recognise
from edge.openai_wire import ApiError
from edge.openapi import IDEMPOTENCY_KEY, SESSION_ID_HEADER, Param, operation
from edge.webkeys import PRINCIPAL, json_response

__all__ = ["count_message_tokens", "create_message"]

API_KEY_HEADER = Param(
    "x-api-key",
    str,
    "The API key, as Anthropic's clients send it; the same as `Authorization: Bearer`.",
)
ANTHROPIC_VERSION = Param(
    "anthropic-version", str, "Accepted, any value or none: there is one version of this API."
)
_HEADERS = (API_KEY_HEADER, ANTHROPIC_VERSION)


class _MessagesDoor:
    """Anthropic's Message, or its events; the conversation recorded before either ends."""

    name = "messages"

    def __init__(self, index: HistoryIndex, conversation: Conversation) -> None:
        self._index = index
        self._conversation = conversation

    async def _ended(self, start: StartTurn, result: TurnDone | TurnError) -> None:
        if isinstance(result, TurnDone):
            await self._conversation.answered(self._index, start, result)
        else:
            await self._conversation.failed(self._index)

    async def complete(self, start: StartTurn, result: TurnDone | TurnError) -> web.Response:
        await self._ended(start, result)
        if isinstance(result, TurnError):
            raise ApiError.of(result.error)
        return json_response(message_of(start, result), headers={SESSION_HEADER: start.session_id})

    async def stream(
        self,
        request: web.Request,
        start: StartTurn,
        batches: AsyncIterator[list[TurnItem]],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        async def ended(result: TurnDone | TurnError) -> None:
            await self._ended(start, result)

        return await stream_message(request, start, batches, headers, ended)


@operation(
    "Create a message",
    description="Anthropic's Messages API, on a session. Resend the whole conversation, "
    "as Anthropic's clients do: it is recognised as the session that holds it, and only "
    "what is new is added. Or name the session with X-Session-Id and send only what is "
    "new. The answer carries the session in the X-Session-Id header (and `session_id`). "
    "With `stream: true`, Anthropic's server-sent events. Errors come in Anthropic's "
    "shape. Images, documents and `top_k` are refused with a 400.",
    tags=("chat",),
    body=MessagesRequest,
    body_examples={
        "one message": {
            "model": "veil",
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": "Hello"}],
        },
        "streamed, with a system prompt": {
            "model": "veil",
            "max_tokens": 256,
            "system": "Answer briefly.",
            "messages": [
                {"role": "user", "content": "I'm Ann."},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello, Ann."}]},
                {"role": "user", "content": "Who am I?"},
            ],
            "stream": True,
        },
    },
    ok=AnthropicMessage,
    sse=(
        MessageStart,
        ContentBlockStart,
        ContentBlockDelta,
        ContentBlockStop,
        MessageDelta,
        MessageStop,
        Ping,
        AnthropicErrorBody,
    ),
    sse_done=False,
    ok_headers=(SESSION_ID_HEADER,),
    headers=(SESSION_ID_HEADER, IDEMPOTENCY_KEY, *_HEADERS),
    errors=(400, 404, 408, 413, 415, 422, 502, 503, 504),
    rate_limited=True,
    error_body=AnthropicErrorBody,
)
async def create_message(request: web.Request) -> web.StreamResponse:
    principal = request[PRINCIPAL]
    require_scope(principal, "chat")
    message = parse_messages_request(await read_body(request))
    check_model(request, message.model)
    command_id = command_id_for(request, principal)
    chat, conversation = await recognise(request, to_chat_request(message), command_id)
    door = _MessagesDoor(request.app[HISTORY], conversation)
    return await run_chat_turn(request, chat, door, command_id)


@operation(
    "Count a message's tokens",
    description="An estimate of the input tokens of a Messages request (its characters "
    "over four, the rule the rate limits count by), not a model's own tokenizer. The "
    "session's stored history is not counted.",
    tags=("chat",),
    body=CountTokensRequest,
    ok=TokenCount,
    headers=_HEADERS,
    errors=(400, 404, 408, 413, 415, 503),
    error_body=AnthropicErrorBody,
)
async def count_message_tokens(request: web.Request) -> web.Response:
    require_scope(request[PRINCIPAL], "chat")
    counted = parse_count_request(await read_body(request))
    check_model(request, counted.model)
    return json_response(TokenCount(input_tokens=count_tokens(counted)))
