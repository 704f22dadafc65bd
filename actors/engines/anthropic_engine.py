"""Engine for Anthropic's Messages API via the official anthropic SDK.

Translates both ways: OpenAI-style system messages become the top-level
`system`, consecutive messages of one role are merged (the API wants turns to
alternate), stop reasons and usage come back in OpenAI's terms.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import anthropic

from actors.engines.base import DeltaSink, EngineError, EngineOutput, ToolCallPiece
from eventstore.events import ChatMessage, FunctionCall, ToolCall, Usage

__all__ = ["AnthropicEngine", "to_anthropic"]

DEFAULT_BASE_URL = "https://api.anthropic.com"

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# OpenAI parameters that the Messages API has no equivalent for.
UNSUPPORTED = ("seed", "response_format", "presence_penalty", "frequency_penalty")


def _blocks(message: ChatMessage) -> list[dict[str, Any]]:
    """A message as Anthropic content blocks: text, tool_use for calls, tool_result for answers."""
    if message.role == "tool":
        return [
            {
                "type": "tool_result",
                "tool_use_id": message.tool_call_id or "",
                "content": message.content,
            }
        ]
    blocks: list[dict[str, Any]] = []
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    for call in message.tool_calls or ():
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError:
            arguments = {"_unparsed": call.function.arguments}
        blocks.append(
            {"type": "tool_use", "id": call.id, "name": call.function.name, "input": arguments}
        )
    return blocks


def to_anthropic(messages: list[ChatMessage]) -> tuple[str | None, list[dict[str, Any]]]:
    """System prompt and alternating user/assistant turns of content blocks."""
    system = [m.content for m in messages if m.role in ("system", "developer")]
    turns: list[dict[str, Any]] = []
    for m in messages:
        if m.role in ("system", "developer"):
            continue
        role = "assistant" if m.role == "assistant" else "user"
        blocks = _blocks(m)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    # Plain text turns keep their simple form: what the API (and its logs) show most.
    for turn in turns:
        if all(b["type"] == "text" for b in turn["content"]):
            turn["content"] = "\n\n".join(b["text"] for b in turn["content"])
    return ("\n\n".join(system) if system else None), turns


def to_anthropic_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        function = tool.get("function", {})
        entry = {
            "name": function["name"],
            "input_schema": function.get("parameters") or {"type": "object"},
        }
        if function.get("description"):
            entry["description"] = function["description"]
        out.append(entry)
    return out


def to_anthropic_tool_choice(choice: Any, parallel: bool | None) -> dict[str, Any] | None:
    mapped: dict[str, Any] | None
    if choice is None:
        mapped = {"type": "auto"} if parallel is False else None
    elif choice == "auto":
        mapped = {"type": "auto"}
    elif choice == "none":
        mapped = {"type": "none"}
    elif choice == "required":
        mapped = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        mapped = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise EngineError(400, "unsupported_parameter", f"Unsupported tool_choice: {choice!r}")
    if mapped is not None and parallel is False and mapped["type"] != "none":
        mapped["disable_parallel_tool_use"] = True
    return mapped


def _retry_after(error: anthropic.APIStatusError) -> float | None:
    value = error.response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def translate_error(error: Exception) -> EngineError:
    if isinstance(error, anthropic.APITimeoutError):
        return EngineError(
            504, "upstream_timeout", "The upstream model did not answer in time.", retryable=True
        )
    if isinstance(error, anthropic.APIStatusError):
        return EngineError(
            502,
            "upstream_error",
            f"The upstream model failed with HTTP {error.status_code}.",
            detail=error.message,
            retryable=error.status_code == 429 or error.status_code >= 500,
            retry_after=_retry_after(error),
        )
    if isinstance(error, anthropic.APIConnectionError):
        return EngineError(
            502,
            "upstream_unreachable",
            "The upstream model could not be reached.",
            detail=f"{type(error).__name__}: {error}",
            retryable=True,
        )
    return EngineError(502, "upstream_error", "The upstream model failed.", detail=repr(error))


class AnthropicEngine:
    def __init__(
        self,
        name: str,
        *,
        base_url: str | None,
        api_key: str | None,
        timeout: float,
        default_max_tokens: int,
    ) -> None:
        self.name = name
        self._default_max_tokens = default_max_tokens
        self._secrets = (api_key,)
        self._client = anthropic.AsyncAnthropic(
            base_url=base_url or os.environ.get("ANTHROPIC_BASE_URL") or DEFAULT_BASE_URL,
            api_key=api_key or "not-needed",
            max_retries=0,
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._client.close()

    def _request(
        self, model: str, messages: list[ChatMessage], params: dict[str, Any]
    ) -> dict[str, Any]:
        for name in UNSUPPORTED:
            if params.get(name) is not None:
                raise EngineError(
                    400,
                    "unsupported_parameter",
                    f"The parameter '{name}' is not supported by this model.",
                )
        system, turns = to_anthropic(messages)
        max_tokens = params.get("max_completion_tokens") or params.get("max_tokens")
        request: dict[str, Any] = {
            "model": model,
            "messages": turns,
            "max_tokens": max_tokens or self._default_max_tokens,
        }
        if system:
            request["system"] = system
        # This SDK no longer types temperature/top_p; the Messages API still takes them.
        sampling = {k: params[k] for k in ("temperature", "top_p") if params.get(k) is not None}
        if sampling:
            request["extra_body"] = sampling
        stop = params.get("stop")
        if stop:
            request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
        if params.get("user"):
            request["metadata"] = {"user_id": params["user"]}
        if params.get("tools"):
            request["tools"] = to_anthropic_tools(params["tools"])
        choice = to_anthropic_tool_choice(
            params.get("tool_choice"), params.get("parallel_tool_calls")
        )
        if choice is not None and params.get("tools"):
            request["tool_choice"] = choice
        return request

    async def generate(
        self,
        model: str,
        messages: list[ChatMessage],
        params: dict[str, Any],
        on_delta: DeltaSink | None,
        output: EngineOutput,
    ) -> None:
        request = self._request(model, messages, params)
        try:
            if on_delta is None:
                message = await self._client.messages.create(**request)
                output.parts.extend(b.text for b in message.content if b.type == "text")
                output.tool_calls.extend(
                    ToolCall(
                        id=b.id, function=FunctionCall(name=b.name, arguments=_arguments(b.input))
                    )
                    for b in message.content
                    if b.type == "tool_use"
                )
                output.finish_reason = FINISH_REASONS.get(message.stop_reason or "", "stop")
                output.usage = _usage(message.usage.input_tokens, message.usage.output_tokens)
            else:
                await self._stream(request, on_delta, output)
        except anthropic.AnthropicError as error:
            raise translate_error(error).redacted(self._secrets) from None
        except EngineError as error:
            raise error.redacted(self._secrets) from None

    async def _stream(
        self, request: dict[str, Any], on_delta: DeltaSink, output: EngineOutput
    ) -> None:
        started = time.perf_counter()
        input_tokens = output_tokens = 0
        stream = await self._client.messages.create(stream=True, **request)
        # Content block index -> the tool call being streamed in it.
        calls: dict[int, dict[str, Any]] = {}
        try:
            async for event in stream:
                if event.type == "message_start":
                    input_tokens = event.message.usage.input_tokens
                elif event.type == "content_block_start" and event.content_block.type == "tool_use":
                    block = event.content_block
                    calls[event.index] = {"id": block.id, "name": block.name, "arguments": []}
                    await on_delta(
                        ToolCallPiece(index=len(calls) - 1, id=block.id, name=block.name)
                    )
                elif event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                    call = calls.get(event.index)
                    if call is not None and event.delta.partial_json:
                        call["arguments"].append(event.delta.partial_json)
                        position = list(calls).index(event.index)
                        await on_delta(
                            ToolCallPiece(index=position, arguments=event.delta.partial_json)
                        )
                elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                    if output.ttft_ms is None:
                        output.ttft_ms = (time.perf_counter() - started) * 1000
                    output.parts.append(event.delta.text)
                    await on_delta(event.delta.text)
                elif event.type == "message_delta":
                    output.finish_reason = FINISH_REASONS.get(event.delta.stop_reason or "", "stop")
                    output_tokens = event.usage.output_tokens
                elif event.type == "error":  # pragma: no cover - the SDK raises first
                    raise EngineError(
                        502,
                        "upstream_error",
                        "The upstream model reported an error.",
                        detail=str(event),
                    )
        finally:
            await stream.close()
        output.usage = _usage(input_tokens, output_tokens)
        output.tool_calls.extend(
            ToolCall(
                id=c["id"],
                function=FunctionCall(name=c["name"], arguments="".join(c["arguments"]) or "{}"),
            )
            for c in calls.values()
        )


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _usage(input_tokens: int, output_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=input_tokens,
        completion_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
    )
