"""Generation: a session actor asks a model actor (`model.<engine>.generate`) for one answer."""

from __future__ import annotations

from typing import Any

import msgspec

from bus.codec import Codec
from contracts.errors import ErrorInfo
from eventstore.events import ChatMessage, ToolCall, Usage

__all__ = [
    "GENERATE_CODEC",
    "GENERATE_RESULT_CODEC",
    "GENERATION_PARAMS",
    "JOB_PROBE_CODEC",
    "JOB_RUNNING_CODEC",
    "SAMPLING_PARAMS",
    "TOOL_PARAMS",
    "GenerateRequest",
    "GenerateResult",
    "JobProbe",
    "JobRunning",
]

# The OpenAI generation parameters Veil carries from a request to an engine.
SAMPLING_PARAMS = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
)
TOOL_PARAMS = ("tools", "tool_choice", "parallel_tool_calls")
GENERATION_PARAMS = (*SAMPLING_PARAMS, "user", *TOOL_PARAMS, "n")


class GenerateRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Session actor -> model actor: one generation against one engine."""

    turn_id: str
    upstream_model: str
    messages: list[ChatMessage]
    params: dict[str, Any] = {}
    # Publish deltas here when set; a non-streaming turn leaves it empty.
    out_subject: str | None = None
    cancel_subject: str | None = None
    # Server-side tools: their calls never stream to the client.
    hidden_tools: list[str] = []
    # The caller's name for this call: a model actor running it says so when asked
    # (JobProbe), so a caller whose model worker died stops waiting.
    job_id: str | None = None


class JobProbe(msgspec.Struct, frozen=True, kw_only=True):
    """Session actor -> every model actor: who runs this job? Only its runner answers."""

    job_id: str


class JobRunning(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str


JOB_PROBE_CODEC: Codec[JobProbe] = Codec(JobProbe)
JOB_RUNNING_CODEC: Codec[JobRunning] = Codec(JobRunning)


class GenerateResult(msgspec.Struct, frozen=True, kw_only=True):
    engine: str
    upstream_model: str
    content: str = ""
    finish_reason: str = "stop"
    usage: Usage = Usage()
    # The upstream reported no usage: Veil counted the text with its own estimate.
    usage_estimated: bool = False
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    deltas: int = 0
    error: ErrorInfo | None = None
    cancelled: bool = False
    tool_calls: list[ToolCall] = []
    alternatives: list[str] = []


GENERATE_CODEC: Codec[GenerateRequest] = Codec(GenerateRequest)
GENERATE_RESULT_CODEC: Codec[GenerateResult] = Codec(GenerateResult)
