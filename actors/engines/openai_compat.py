"""Engine for OpenAI-compatible upstreams (OpenAI, vLLM, llama.cpp, Ollama) via the openai SDK."""

from __future__ import annotations

import os
import time
from typing import Any

import openai

from actors.engines.base import (
    GENERATION_PARAMS,
    ChoicePiece,
    DeltaSink,
    EngineError,
    EngineOutput,
    ToolCallPiece,
)
from eventstore.events import ChatMessage, FunctionCall, ToolCall, Usage

__all__ = ["PASSTHROUGH", "OpenAIEngine"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"

# Client parameters sent upstream as they are: all of them.
PASSTHROUGH = GENERATION_PARAMS


def _body(wire: list[dict[str, Any]], kwargs: dict[str, Any]) -> dict[str, Any]:
    """SDK arguments with the messages (and tools) in extra_body.

    The SDK walks typed request parameters recursively before sending them,
    which costs about 0.1 ms per message: a long conversation spent more CPU
    there than in all of Veil. These are already in the wire format, so they
    skip that walk; the JSON the upstream receives is the same.
    """
    extra = {"messages": wire}
    rest = dict(kwargs)
    if "tools" in rest:
        extra["tools"] = rest.pop("tools")
    return {"messages": [], "extra_body": extra, **rest}


def to_wire(message: ChatMessage) -> dict[str, Any]:
    """One message in OpenAI's request shape, tool calls and tool answers included."""
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        wire["content"] = message.content or None
        wire["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        wire["tool_call_id"] = message.tool_call_id
    if message.name is not None and message.role != "tool":
        wire["name"] = message.name
    return wire


def _retry_after(error: openai.APIStatusError) -> float | None:
    value = error.response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def translate_error(error: Exception) -> EngineError:
    """An SDK exception as the error Veil's client sees (502 or 504, with the reason)."""
    if isinstance(error, openai.APITimeoutError):
        return EngineError(
            504, "upstream_timeout", "The upstream model did not answer in time.", retryable=True
        )
    if isinstance(error, openai.APIStatusError):
        return EngineError(
            502,
            "upstream_error",
            f"The upstream model failed with HTTP {error.status_code}: {error.message}",
            retryable=error.status_code == 429 or error.status_code >= 500,
            retry_after=_retry_after(error),
        )
    if isinstance(error, openai.APIConnectionError):
        return EngineError(
            502, "upstream_unreachable", f"The upstream model could not be reached: {error}", retryable=True
        )
    return EngineError(502, "upstream_error", f"The upstream model failed: {error!r}")


class OpenAIEngine:
    """One upstream base URL and key; any model name behind it."""

    def __init__(self, name: str, *, base_url: str | None, api_key: str | None, timeout: float) -> None:
        self.name = name
        # Retries and fallbacks are Veil's decision, recorded as events: the SDK makes none.
        # Resolved here, not by the SDK: an empty OPENAI_BASE_URL (compose passes
        # one through) would otherwise become the base URL.
        self._client = openai.AsyncOpenAI(
            base_url=base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL, api_key=api_key or "not-needed", max_retries=0, timeout=timeout
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def generate(
        self,
        model: str,
        messages: list[ChatMessage],
        params: dict[str, Any],
        on_delta: DeltaSink | None,
        output: EngineOutput,
    ) -> None:
        wire = [to_wire(m) for m in messages]
        kwargs = {k: params[k] for k in PASSTHROUGH if k in params}
        try:
            if on_delta is None:
                await self._complete(model, wire, kwargs, output)
            else:
                await self._stream(model, wire, kwargs, on_delta, output)
        except openai.OpenAIError as error:
            raise translate_error(error) from error

    async def _complete(
        self, model: str, wire: list[dict[str, Any]], kwargs: dict[str, Any], output: EngineOutput
    ) -> None:
        response = await self._client.chat.completions.create(
            model=model, **_body(wire, kwargs)
        )
        choice = response.choices[0]
        output.parts.append(choice.message.content or "")
        output.finish_reason = choice.finish_reason or "stop"
        output.alternatives.extend(c.message.content or "" for c in response.choices[1:])
        for call in choice.message.tool_calls or []:
            function = getattr(call, "function", None)
            if function is not None:
                output.tool_calls.append(
                    ToolCall(id=call.id, function=FunctionCall(name=function.name, arguments=function.arguments))
                )
        if response.usage is not None:
            output.usage = Usage(
                prompt_tokens=response.usage.prompt_tokens,
                completion_tokens=response.usage.completion_tokens,
                total_tokens=response.usage.total_tokens,
            )

    async def _stream(
        self,
        model: str,
        wire: list[dict[str, Any]],
        kwargs: dict[str, Any],
        on_delta: DeltaSink,
        output: EngineOutput,
    ) -> None:
        started = time.perf_counter()
        stream = await self._client.chat.completions.create(
            model=model,
            stream=True,
            stream_options={"include_usage": True},
            **_body(wire, kwargs),
        )
        calls: list[Any] = []
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
            await stream.close()
        output.tool_calls.extend(assemble_tool_calls(calls))
        output.alternatives.extend("".join(alternatives[i]) for i in sorted(alternatives))


def assemble_tool_calls(pieces: list[Any]) -> list[ToolCall]:
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
        ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments="".join(c["arguments"])))
        for _, c in sorted(by_index.items())
    ]
