"""Model engines: one client per configured upstream."""

from __future__ import annotations

from actors.engines.base import DeltaSink, Engine, EngineError, EngineOutput, estimate_tokens
from veil.config import Config

__all__ = ["DeltaSink", "Engine", "EngineError", "EngineOutput", "build_engine", "estimate_tokens"]


def build_engine(config: Config, name: str) -> Engine:
    spec = config.engines[name]
    api_key = config.engine_api_key(name)
    if spec.kind == "openai":
        from actors.engines.openai_compat import OpenAIEngine

        return OpenAIEngine(name, base_url=spec.base_url, api_key=api_key, timeout=spec.timeout)
    if spec.kind == "anthropic":
        from actors.engines.anthropic_engine import AnthropicEngine

        return AnthropicEngine(
            name,
            base_url=spec.base_url,
            api_key=api_key,
            timeout=spec.timeout,
            default_max_tokens=spec.default_max_tokens,
        )
    raise ValueError(f"unknown engine kind {spec.kind!r}")
