"""Engine for OpenAI-compatible upstreams (OpenAI, vLLM, llama.cpp, Ollama) via the openai SDK."""

from __future__ import annotations

import os
import time
from typing import Any

import openai

from actors.engines.base import DeltaSink, EngineError, EngineOutput
from eventstore.events import ChatMessage, Usage

__all__ = ["PASSTHROUGH", "OpenAIEngine"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"

# Client parameters sent upstream as they are.
PASSTHROUGH = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "user",
)


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
        wire = [{"role": m.role, "content": m.content} for m in messages]
        kwargs = {k: params[k] for k in PASSTHROUGH if k in params}
        try:
            if on_delta is None:
                await self._complete(model, wire, kwargs, output)
            else:
                await self._stream(model, wire, kwargs, on_delta, output)
        except openai.OpenAIError as error:
            raise translate_error(error) from error

    async def _complete(
        self, model: str, wire: list[dict[str, str]], kwargs: dict[str, Any], output: EngineOutput
    ) -> None:
        response = await self._client.chat.completions.create(model=model, messages=wire, **kwargs)  # type: ignore[arg-type]
        choice = response.choices[0]
        output.parts.append(choice.message.content or "")
        output.finish_reason = choice.finish_reason or "stop"
        if response.usage is not None:
            output.usage = Usage(
                prompt_tokens=response.usage.prompt_tokens,
                completion_tokens=response.usage.completion_tokens,
                total_tokens=response.usage.total_tokens,
            )

    async def _stream(
        self,
        model: str,
        wire: list[dict[str, str]],
        kwargs: dict[str, Any],
        on_delta: DeltaSink,
        output: EngineOutput,
    ) -> None:
        started = time.perf_counter()
        stream = await self._client.chat.completions.create(  # type: ignore[call-overload]
            model=model,
            messages=wire,
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,
        )
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
                text = choice.delta.content if choice.delta else None
                if text:
                    if output.ttft_ms is None:
                        output.ttft_ms = (time.perf_counter() - started) * 1000
                    output.parts.append(text)
                    await on_delta(text)
                if choice.finish_reason:
                    output.finish_reason = choice.finish_reason
        finally:
            await stream.close()
