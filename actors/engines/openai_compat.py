"""Engine for OpenAI-compatible upstreams (OpenAI, vLLM, llama.cpp, Ollama), over their wire."""

from __future__ import annotations

import time
from typing import Any

from actors.engines.base import ChoicePiece, DeltaSink, EngineError, EngineOutput, ToolCallPiece
from actors.engines.openai_http import OpenAIHTTP, ToolCallPart
from contracts.model import GENERATION_PARAMS
from eventstore.events import ChatMessage, FunctionCall, ToolCall, Usage

__all__ = ["PASSTHROUGH", "OpenAIEngine"]

# Client parameters sent upstream as they are: all of them.
PASSTHROUGH = GENERATION_PARAMS


def to_wire(message: ChatMessage) -> dict[str, Any]:
    """One message in OpenAI's request shape, tool calls and tool answers included."""
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        wire["content"] = message.content or None
        wire["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        wire["tool_call_id"] = message.tool_call_id
    if message.name is not None and message.role != "tool":
        wire["name"] = message.name
    return wire


class OpenAIEngine:
    """One upstream base URL and key; any model name behind it."""

    def __init__(
        self, name: str, *, base_url: str | None, api_key: str | None, timeout: float
    ) -> None:
        self.name = name
        # Retries and fallbacks are Veil's decision, recorded as events: the client makes none.
        self._client = OpenAIHTTP(base_url=base_url, api_key=api_key, timeout=timeout)
        self._secrets = (api_key,)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def generate(
        self,
        model: str,
        messages: list[ChatMessage],
        params: dict[str, Any],
        on_delta: DeltaSink | None,
        output: EngineOutput,
    ) -> None:
        body: dict[str, Any] = {"model": model, "messages": [to_wire(m) for m in messages]}
        body.update((k, params[k]) for k in PASSTHROUGH if k in params)
        try:
            if on_delta is None:
                await self._complete(body, output)
            else:
                await self._stream(body, on_delta, output)
        except EngineError as error:
            raise error.redacted(self._secrets) from None

    async def _complete(self, body: dict[str, Any], output: EngineOutput) -> None:
        response = await self._client.complete(body)
        if not response.choices:
            raise EngineError(502, "upstream_error", "The upstream model answered with no choices.")
        choice = response.choices[0]
        output.parts.append(choice.message.content or "")
        output.finish_reason = choice.finish_reason or "stop"
        output.alternatives.extend(c.message.content or "" for c in response.choices[1:])
        for call in choice.message.tool_calls or []:
            if call.function is not None:
                output.tool_calls.append(
                    ToolCall(
                        id=call.id or "",
                        function=FunctionCall(
                            name=call.function.name or "", arguments=call.function.arguments or ""
                        ),
                    )
                )
        if response.usage is not None:
            output.usage = Usage(
                prompt_tokens=response.usage.prompt_tokens,
                completion_tokens=response.usage.completion_tokens,
                total_tokens=response.usage.total_tokens,
            )

    async def _stream(
        self, body: dict[str, Any], on_delta: DeltaSink, output: EngineOutput
    ) -> None:
        started = time.perf_counter()
        stream = self._client.stream(
            {**body, "stream": True, "stream_options": {"include_usage": True}}
        )
        calls: list[ToolCallPart] = []
        alternatives: dict[int, list[str]] = {}
        try:
            async for chunk in stream:
                if chunk.usage is not None:
                    output.usage = Usage(
                        prompt_tokens=chunk.usage.prompt_tokens,
                        completion_tokens=chunk.usage.completion_tokens,
                        total_tokens=chunk.usage.total_tokens,
                    )
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if choice.index:
                    # Another of n choices: the client sees it; the session goes on from the first.
                    more = choice.delta.content if choice.delta else None
                    if more:
                        alternatives.setdefault(choice.index, []).append(more)
                        await on_delta(ChoicePiece(index=choice.index, text=more))
                    continue
                text = choice.delta.content if choice.delta else None
                if text:
                    if output.ttft_ms is None:
                        output.ttft_ms = (time.perf_counter() - started) * 1000
                    output.parts.append(text)
                    await on_delta(text)
                for piece in (choice.delta.tool_calls or []) if choice.delta else []:
                    calls.append(piece)
                    await on_delta(
                        ToolCallPiece(
                            index=piece.index,
                            id=piece.id,
                            name=piece.function.name if piece.function else None,
                            arguments=(piece.function.arguments or "") if piece.function else "",
                        )
                    )
                if choice.finish_reason:
                    output.finish_reason = choice.finish_reason
        finally:
            await stream.aclose()
        output.tool_calls.extend(assemble_tool_calls(calls))
        output.alternatives.extend("".join(alternatives[i]) for i in sorted(alternatives))


def assemble_tool_calls(pieces: list[ToolCallPart]) -> list[ToolCall]:
    """Whole tool calls from streamed pieces: id and name once, arguments concatenated."""
    by_index: dict[int, dict[str, Any]] = {}
    for piece in pieces:
        call = by_index.setdefault(piece.index, {"id": "", "name": "", "arguments": []})
        if piece.id:
            call["id"] = piece.id
        if piece.function is not None:
            if piece.function.name:
                call["name"] = piece.function.name
            if piece.function.arguments:
                call["arguments"].append(piece.function.arguments)
    return [
        ToolCall(
            id=c["id"], function=FunctionCall(name=c["name"], arguments="".join(c["arguments"]))
        )
        for _, c in sorted(by_index.items())
    ]
