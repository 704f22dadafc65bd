"""A turn's output as Server-Sent Events, in OpenAI's chat.completion.chunk format."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from bus.codec import encode
from contracts.session import Delta, StartTurn, ToolDelta, TurnDone, TurnError
from edge.openai_wire import (
    ApiError,
    ChunkMeta,
    chunk,
    error_body,
    tool_delta_wire,
    whole_call_delta,
)
from edge.relay import ClientGone
from edge.responses import ChatCompletionChunk, ChunkDelta, ErrorBody

__all__ = ["open_stream", "stream_turn", "write_events"]


async def open_stream(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
    """An event stream's response, its headers sent (every door's stream starts so)."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            **headers,
        }
    )
    await response.prepare(request)
    return response


async def write_events(response: web.StreamResponse, out: list[bytes], last: bool = False) -> None:
    """Write (and clear) the events gathered in `out` as one write; the last closes the
    stream. A client that hung up is ClientGone."""
    data = b"".join(out)
    out.clear()
    try:
        if last:
            await response.write_eof(data)
        else:
            await response.write(data)
    except ConnectionResetError:
        raise ClientGone() from None


async def stream_turn(
    request: web.Request,
    start: StartTurn,
    batches: AsyncIterator[list[Delta | ToolDelta | TurnDone | TurnError]],
    include_usage: bool,
    headers: dict[str, str],
) -> web.StreamResponse:
    """SSE in OpenAI's chunk format. Headers go out with the first event, so a
    failure before any token is still a plain HTTP error. What arrived together
    is written together: one write (and one syscall) per batch, not per chunk."""
    response: web.StreamResponse | None = None
    created = int(time.time())
    meta = ChunkMeta(
        id=f"chatcmpl-{start.turn_id}",
        created=created,
        model=start.model,
        session_id=start.session_id,
    )
    streamed: list[str] = []
    streamed_calls: set[int] = set()
    others: set[int] = set()  # indexes of choices after the first (n > 1)
    out: list[bytes] = []

    def send(body: ChatCompletionChunk | ErrorBody) -> None:
        out.append(b"data: " + encode(body) + b"\n\n")

    async def flush(last: bool = False) -> None:
        assert response is not None
        await write_events(response, out, last)

    async for batch in batches:
        for item in batch:
            if isinstance(item, TurnError) and response is None:
                raise ApiError.of(item.error)
            if response is None:
                response = await open_stream(request, headers)
                send(
                    chunk(
                        meta,
                        delta=ChunkDelta(role="assistant", content=""),
                        include_usage=include_usage,
                    )
                )
            if isinstance(item, Delta):
                if item.choice:
                    if item.choice not in others:
                        others.add(item.choice)
                        send(
                            chunk(
                                meta,
                                delta=ChunkDelta(role="assistant", content=""),
                                include_usage=include_usage,
                                index=item.choice,
                            )
                        )
                    send(
                        chunk(
                            meta,
                            delta=ChunkDelta(content=item.text),
                            include_usage=include_usage,
                            index=item.choice,
                        )
                    )
                    continue
                streamed.append(item.text)
                send(chunk(meta, delta=ChunkDelta(content=item.text), include_usage=include_usage))
                continue
            if isinstance(item, ToolDelta):
                streamed_calls.add(item.index)
                send(
                    chunk(
                        meta,
                        delta=ChunkDelta(tool_calls=[tool_delta_wire(item)]),
                        include_usage=include_usage,
                    )
                )
                continue
            _finish(item, meta, streamed, streamed_calls, others, include_usage, send)
            if isinstance(item, TurnDone):
                out.append(b"data: [DONE]\n\n")
            await flush(last=True)
            return response
        await flush()
    raise ApiError(502, "The turn's output ended without a final message.", code="actor_failed")


def _finish(
    item: TurnDone | TurnError,
    meta: ChunkMeta,
    streamed: list[str],
    streamed_calls: set[int],
    others: set[int],
    include_usage: bool,
    send: Callable[[ChatCompletionChunk | ErrorBody], None],
) -> None:
    """The chunks that close a stream: missing text, whole tool calls, finish and usage,
    or the error that ended it."""
    # The final message carries the whole text: send whatever deltas did not arrive.
    sent = "".join(streamed)
    rest = item.content[len(sent) :] if item.content.startswith(sent) else ""
    if rest:
        send(chunk(meta, delta=ChunkDelta(content=rest), include_usage=include_usage))
    if isinstance(item, TurnError):
        e = item.error
        send(error_body(e.message, e.type, e.code, e.param))
        return
    # Calls whose pieces never arrived (a replayed result) go out whole.
    for index, call in enumerate(item.tool_calls):
        if index not in streamed_calls:
            whole = whole_call_delta(index, call)
            send(chunk(meta, delta=ChunkDelta(tool_calls=[whole]), include_usage=include_usage))
    send(chunk(meta, finish_reason=item.finish_reason, include_usage=include_usage))
    for index in sorted(others):
        send(
            chunk(meta, finish_reason=item.finish_reason, include_usage=include_usage, index=index)
        )
    if include_usage:
        send(chunk(meta, usage=item.usage))
