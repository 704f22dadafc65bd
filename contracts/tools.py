"""Server-side tools: a session actor asks the tool actor (`tools.run`) to run one call."""

from __future__ import annotations

import msgspec

from bus.codec import Codec

__all__ = ["BUILTIN_TOOLS", "RUN_CODEC", "RUN_REPLY_CODEC", "RunTool", "ToolRan"]

# The tools every Veil has: pipelines may name them without defining them in the config.
BUILTIN_TOOLS = ("calculator", "current_time", "memory_search", "knowledge_search")


class RunTool(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    # JSON text as the model wrote it.
    arguments: str
    timeout: float = 10.0
    # The turn's scope, for contextual tools (memory search).
    context: dict[str, str | None] = {}


class ToolRan(msgspec.Struct, frozen=True, kw_only=True):
    content: str = ""
    error: str | None = None
    duration_ms: float = 0.0


RUN_CODEC: Codec[RunTool] = Codec(RunTool)
RUN_REPLY_CODEC: Codec[ToolRan] = Codec(ToolRan)
