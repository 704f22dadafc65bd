"""A turn's output as Anthropic's stream: `message_start`, `ping`, content blocks (text
and tool_use) opened, filled and stopped one after the other, `message_delta` with the
stop reason and usage, `message_stop`; `error` when the turn fails mid-way.

Headers go out with the first event, so a failure before any output is still a plain
HTTP error. What arrived together is written together, one write per batch. A tool
call's arguments stream as `input_json_delta` pieces while its block is the open one
(engines send calls one after the other); a call that never streamed (a replayed
result) goes out whole at the end, as does text that no delta carried.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from bus.codec import encode
from contracts.session import Delta, StartTurn, ToolDelta, TurnDone, TurnError
from edge.anthropic_answer import message_id, stop_reason, tool_blocks
from edge.anthropic_errors import anthropic_error
from edge.anthropic_responses import (
    AnthropicErrorBody,
    AnthropicMessage,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    DeltaUsage,
    InputJsonDelta,
    MessageDelta,
    MessageDeltaBody,
    MessageStart,
    MessageStop,
    MessageUsage,
    Ping,
    StreamEvent,
    TextDelta,
    TextOut,
    ToolUseOut,
)
from edge.openai_wire import ApiError
from edge.sse import open_stream, write_events

__all__ = ["stream_message"]

Item = Delta | ToolDelta | TurnDone | TurnError
# Called with the final item before the stream's last events are written.
OnEnd = Callable[[TurnDone | TurnError], Awaitable[None]]


class _Events:
    """The events of one message, and which content block is open."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.started = 0  # content blocks started so far
        self.open: str | int | None = None  # "text", a tool call's index, or none
        self.text: list[str] = []  # what text deltas carried
        self.calls: set[int] = set()  # tool calls whose block was opened

    def send(self, event: StreamEvent | AnthropicErrorBody) -> None:
        name = "error" if isinstance(event, AnthropicErrorBody) else event.__struct_config__.tag
        assert isinstance(name, str)
        self.out.append(b"event: " + name.encode() + b"\ndata: " + encode(event) + b"\n\n")

    def close(self) -> None:
        if self.open is not None:
            self.send(ContentBlockStop(index=self.started - 1))
            self.open = None

    def _start(self, kind: str | int, block: TextOut | ToolUseOut) -> None:
        self.close()
        self.open = kind
        self.send(ContentBlockStart(index=self.started, content_block=block))
        self.started += 1

    def add_text(self, text: str) -> None:
        if self.open != "text":
            self._start("text", TextOut(text=""))
        self.text.append(text)
        self.send(ContentBlockDelta(index=self.started - 1, delta=TextDelta(text=text)))

    def add_tool_piece(self, piece: ToolDelta) -> None:
        if piece.id is not None:
            self.calls.add(piece.index)
            self._start(piece.index, ToolUseOut(id=piece.id, name=piece.name or "", input={}))
        if piece.arguments and self.open == piece.index:
            delta = InputJsonDelta(partial_json=piece.arguments)
            self.send(ContentBlockDelta(index=self.started - 1, delta=delta))

    def add_rest(self, content: str) -> None:
        """The final message carries the whole text: send whatever deltas did not."""
        sent = "".join(self.text)
        rest = content[len(sent) :] if content.startswith(sent) else ""
        if rest:
            self.add_text(rest)

    def finish(self, done: TurnDone) -> None:
        self.add_rest(done.content)
        for index, block in enumerate(tool_blocks(done.tool_calls)):
            if index not in self.calls:  # never streamed: whole, in one piece
                self._start(index, ToolUseOut(id=block.id, name=block.name, input={}))
                whole = InputJsonDelta(partial_json=encode(block.input).decode())
                self.send(ContentBlockDelta(index=self.started - 1, delta=whole))
        self.close()
        usage = DeltaUsage(
            input_tokens=done.usage.prompt_tokens, output_tokens=done.usage.completion_tokens
        )
        body = MessageDeltaBody(stop_reason=stop_reason(done.finish_reason), stop_sequence=None)
        self.send(MessageDelta(delta=body, usage=usage))
        self.send(MessageStop())


def _first(start: StartTurn) -> MessageStart:
    empty = MessageUsage(
        input_tokens=0, output_tokens=0, cache_creation_input_tokens=0, cache_read_input_tokens=0
    )
    message = AnthropicMessage(
        id=message_id(start),
        type="message",
        role="assistant",
        model=start.model,
        content=[],
        stop_reason=None,
        stop_sequence=None,
        usage=empty,
        session_id=start.session_id,
    )
    return MessageStart(message=message)


async def stream_message(
    request: web.Request,
    start: StartTurn,
    batches: AsyncIterator[list[Item]],
    headers: dict[str, str],
    on_end: OnEnd,
) -> web.StreamResponse:
    """SSE in Anthropic's event format; `on_end` runs before the last events go out
    (so the client's next request finds what it records)."""
    response: web.StreamResponse | None = None
    events = _Events()

    async def flush(last: bool = False) -> None:
        assert response is not None
        await write_events(response, events.out, last)

    async for batch in batches:
        for item in batch:
            if isinstance(item, TurnError) and response is None:
                await on_end(item)
                raise ApiError.of(item.error)
            if response is None:
                response = await open_stream(request, headers)
                events.send(_first(start))
                events.send(Ping())
            if isinstance(item, Delta):
                if not item.choice:  # n is 1 on this door
                    events.add_text(item.text)
                continue
            if isinstance(item, ToolDelta):
                events.add_tool_piece(item)
                continue
            await on_end(item)
            if isinstance(item, TurnDone):
                events.finish(item)
            else:
                events.add_rest(item.content)
                events.send(anthropic_error(item.error.status, item.error.message))
            await flush(last=True)
            return response
        await flush()
    raise ApiError(502, "The turn's output ended without a final message.", code="actor_failed")
