"""Model engines: one client per configured upstream."""

from __future__ import annotations

from actors.engines.base import DeltaSink, Engine, EngineError, EngineOutput, estimate_tokens
from config import UNSUPPORTED_BY_KIND, Config

__all__ = [
    "DeltaSink",
    "Engine",
    "EngineError",
    "EngineOutput",
    "build_engine",
    "estimate_tokens",
    "unsupported_parameter",
]

# Client parameters each kind of engine cannot honour; a request that sets one
# is refused with 400 before anything is written. (The local engine checks
# response_format itself: json_object and json_schema work.)
UNSUPPORTED = UNSUPPORTED_BY_KIND


def unsupported_parameter(kind: str, params: dict[str, object]) -> str | None:
    """The first parameter set in params that this kind of engine cannot honour."""
    for name in sorted(UNSUPPORTED.get(kind, frozenset())):
        if params.get(name) is not None:
            return name
    return None


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
            default_max_tokens=spec.default_max_tokens or 4096,
        )
    if spec.kind == "local":
        from actors.engines.local_model import local_backend

        if local_backend(spec.backend) == "xllamacpp":
            from actors.engines.xllama import XLlamaEngine

            return XLlamaEngine(
                name,
                model_path=spec.model_path,
                n_ctx=spec.n_ctx,
                threads=spec.threads,
                max_tokens_default=spec.default_max_tokens or 512,
            )
        from actors.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(
            name,
            model_path=spec.model_path,
            n_ctx=spec.n_ctx,
            threads=spec.threads,
            max_tokens_default=spec.default_max_tokens or 512,
        )
    if spec.kind == "vllm":
        from actors.engines.vllm_engine import VllmEngine

        assert spec.model is not None
        return VllmEngine(
            name,
            model=spec.model,
            max_model_len=spec.max_model_len,
            dtype=spec.dtype,
            extra_args=spec.vllm_args,
        )
    raise ValueError(f"unknown engine kind {spec.kind!r}")
