"""A turn's output as the Responses API's typed stream: `response.created`,
`response.in_progress`; per output item `response.output_item.added`, then for a
message `response.content_part.added`, `response.output_text.delta`...,
`response.output_text.done`, `response.content_part.done`, for a function call
`response.function_call_arguments.delta`..., `response.function_call_arguments.done`;
`response.output_item.done`; and `response.completed` (or `response.incomplete`), or
`response.failed` when the turn fails after its first event. Every event is named by
`event:` and carries its `type` and a `sequence_number`; no `[DONE]`.

Headers go out with the first event, so a failure before any output is still a plain
HTTP error. What arrived together is written together, one write per batch.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from bus.codec import encode
from contracts.session import Delta, StartTurn, ToolDelta, TurnDone, TurnError
from edge.openai_wire import ApiError
from edge.responses_answer import (
    Settings,
    call_item_id,
    message_item_id,
    output_items,
    response_object,
)
from edge.responses_objects import (
    ContentPartAdded,
    ContentPartDone,
    FunctionCallArgumentsDelta,
    FunctionCallArgumentsDone,
    FunctionCallItem,
    OutputItem,
    OutputItemAdded,
    OutputItemDone,
    OutputMessage,
    OutputText,
    OutputTextDelta,
    OutputTextDone,
    ResponseCompleted,
    ResponseCreated,
    ResponseError,
    ResponseFailed,
    ResponseIncomplete,
    ResponseInProgress,
)
from edge.sse import open_stream, write_events

__all__ = ["stream_response"]

Item = Delta | ToolDelta | TurnDone | TurnError
OnEnd = Callable[[TurnDone | TurnError], Awaitable[None]]


class _Call:
    def __init__(self, output_index: int, item_id: str, call_id: str, name: str) -> None:
        self.output_index = output_index
        self.item_id = item_id
        self.call_id = call_id
        self.name = name
        self.arguments: list[str] = []


class _Events:
    """The events of one response, and which output item is open."""

    def __init__(self, start: StartTurn, settings: Settings) -> None:
        self.start = start
        self.settings = settings
        self.created = int(time.time())
        self.out: list[bytes] = []
        self.seq = 0
        self.items: list[OutputItem] = []  # the finished ones
        self.open: str | int | None = None  # "text", a tool call's index, or none
        self.text: list[str] = []
        self.text_index = -1
        self.calls: dict[int, _Call] = {}

    def send(self, kind: type[Any], **fields: Any) -> None:
        self.seq += 1
        event = kind(**fields, sequence_number=self.seq)
        name = kind.__struct_config__.tag
        self.out.append(b"event: " + name.encode() + b"\ndata: " + encode(event) + b"\n\n")

    def response(self, status: Any, **fields: Any) -> Any:
        return response_object(
            session_id=self.start.session_id,
            turn_id=self.start.turn_id,
            created_at=self.created,
            model=self.start.model,
            settings=self.settings,
            status=status,
            **fields,
        )

    def begin(self) -> None:
        first = self.response("in_progress", output=[], usage=None)
        self.send(ResponseCreated, response=first)
        self.send(ResponseInProgress, response=first)

    @property
    def _message_id(self) -> str:
        return message_item_id(self.start.turn_id)

    def close(self) -> None:
        if self.open == "text":
            text = "".join(self.text)
            part = OutputText(text=text, annotations=[])
            where = {
                "item_id": self._message_id,
                "output_index": self.text_index,
                "content_index": 0,
            }
            self.send(OutputTextDone, **where, text=text, logprobs=[])
            self.send(ContentPartDone, **where, part=part)
            item: OutputItem = OutputMessage(
                id=self._message_id, status="completed", role="assistant", content=[part]
            )
            self.send(OutputItemDone, output_index=self.text_index, item=item)
            self.items.append(item)
        elif isinstance(self.open, int):
            call = self.calls[self.open]
            arguments = "".join(call.arguments)
            self.send(
                FunctionCallArgumentsDone,
                item_id=call.item_id,
                output_index=call.output_index,
                name=call.name,
                arguments=arguments,
            )
            item = FunctionCallItem(
                id=call.item_id,
                call_id=call.call_id,
                name=call.name,
                arguments=arguments,
                status="completed",
            )
            self.send(OutputItemDone, output_index=call.output_index, item=item)
            self.items.append(item)
        self.open = None

    def add_text(self, text: str) -> None:
        if self.open != "text":
            if self.text_index >= 0:
                return  # one message per response: text after a call is in the final one
            self.close()
            self.open = "text"
            self.text_index = len(self.items)
            opened = OutputMessage(
                id=self._message_id, status="in_progress", role="assistant", content=[]
            )
            self.send(OutputItemAdded, output_index=self.text_index, item=opened)
            part = OutputText(text="", annotations=[])
            self.send(
                ContentPartAdded,
                item_id=self._message_id,
                output_index=self.text_index,
                content_index=0,
                part=part,
            )
        self.text.append(text)
        if text:
            self.send(
                OutputTextDelta,
                item_id=self._message_id,
                output_index=self.text_index,
                content_index=0,
                delta=text,
                logprobs=[],
            )

    def open_call(self, index: int, call_id: str, name: str) -> None:
        self.close()
        call = _Call(len(self.items), call_item_id(self.start.turn_id, index), call_id, name)
        self.calls[index] = call
        self.open = index
        item = FunctionCallItem(
            id=call.item_id, call_id=call_id, name=name, arguments="", status="in_progress"
        )
        self.send(OutputItemAdded, output_index=call.output_index, item=item)

    def add_arguments(self, index: int, piece: str) -> None:
        call = self.calls[index]
        call.arguments.append(piece)
        self.send(
            FunctionCallArgumentsDelta,
            item_id=call.item_id,
            output_index=call.output_index,
            delta=piece,
        )

    def add_tool_piece(self, piece: ToolDelta) -> None:
        if piece.id is not None:
            self.open_call(piece.index, piece.id, piece.name or "")
        if piece.arguments and self.open == piece.index:
            self.add_arguments(piece.index, piece.arguments)

    def add_rest(self, content: str) -> None:
        """The final message carries the whole text: send whatever deltas did not."""
        sent = "".join(self.text)
        rest = content[len(sent) :] if content.startswith(sent) else ""
        if rest or (not content and not self.text and self.text_index < 0):
            self.add_text(rest)

    def finish(self, done: TurnDone) -> None:
        if done.content or not done.tool_calls:
            self.add_rest(done.content)
        for index, call in enumerate(done.tool_calls):
            if index not in self.calls:  # never streamed: whole, in one piece
                self.open_call(index, call.id, call.function.name)
                self.add_arguments(index, call.function.arguments)
        self.close()
        final = self.response(
            "completed",
            output=output_items(self.start.turn_id, done.content, done.tool_calls),
            usage=done.usage,
            finish_reason=done.finish_reason,
        )
        kind = ResponseIncomplete if final.status == "incomplete" else ResponseCompleted
        self.send(kind, response=final)

    def fail(self, error: TurnError) -> None:
        self.add_rest(error.content)
        self.close()
        info = error.error
        failed = self.response(
            "failed",
            output=self.items,
            usage=None,
            error=ResponseError(code=info.code or "server_error", message=info.message),
        )
        self.send(ResponseFailed, response=failed)


async def stream_response(
    request: web.Request,
    start: StartTurn,
    settings: Settings,
    batches: AsyncIterator[list[Item]],
    headers: dict[str, str],
    on_end: OnEnd,
) -> web.StreamResponse:
    """SSE in the Responses API's event format; `on_end` runs before the last events go
    out (so the client's next request finds what it records)."""
    response: web.StreamResponse | None = None
    events = _Events(start, settings)

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
                events.begin()
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
                events.fail(item)
            await flush(last=True)
            return response
        await flush()
    raise ApiError(502, "The turn's output ended without a final message.", code="actor_failed")
