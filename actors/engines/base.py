"""What every model engine provides, and how its failures are described."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import msgspec

from actors.tokens import estimate_tokens
from contracts.errors import ErrorInfo, error_type
from contracts.model import SAMPLING_PARAMS
from eventstore.events import ChatMessage, ToolCall, Usage

__all__ = [
    "ChoicePiece",
    "DeltaSink",
    "Engine",
    "EngineError",
    "EngineOutput",
    "ToolCallPiece",
    "estimate_tokens",
    "refuse_unsupported",
]


def refuse_unsupported(params: dict[str, Any], engine: str) -> None:
    """For engines that sample one choice locally: any parameter beyond the sampling
    ones (and `user`, a label for providers) is a 400 naming it."""
    for key, value in params.items():
        if value is None or key in SAMPLING_PARAMS or key == "user":
            continue
        if key == "n":
            if value == 1:
                continue
            raise EngineError(
                400,
                "unsupported_parameter",
                f"The {engine} returns one choice per request: n must be 1.",
            )
        raise EngineError(
            400, "unsupported_parameter", f"The parameter '{key}' is not supported by the {engine}."
        )


class ToolCallPiece(msgspec.Struct, frozen=True, kw_only=True):
    """A streamed piece of the index-th tool call (id and name come with its first piece)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class ChoicePiece(msgspec.Struct, frozen=True, kw_only=True):
    """Text of another choice than the first (n > 1)."""

    index: int
    text: str


# Text pieces of the first choice, tool call pieces, and other choices' text, as they stream.
DeltaSink = Callable[[str | ToolCallPiece | ChoicePiece], Awaitable[None]]


class EngineOutput(msgspec.Struct, kw_only=True):
    # Text pieces as they arrived; joined once at the end.
    parts: list[str] = msgspec.field(default_factory=list)
    finish_reason: str = "stop"
    usage: Usage | None = None
    ttft_ms: float | None = None
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)
    # With n > 1: the other choices' texts (the first is `parts`).
    alternatives: list[str] = msgspec.field(default_factory=list)

    @property
    def content(self) -> str:
        return "".join(self.parts)


class EngineError(Exception):
    """An upstream failure, already translated to the status Veil answers with."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message if detail is None else f"{message} ({detail})")
        self.info = ErrorInfo(
            status=status,
            type=error_type(status),
            code=code,
            message=message,
            retryable=retryable,
            retry_after=retry_after,
            detail=detail,
        )

    def redacted(self, secrets: Iterable[str | None]) -> EngineError:
        """This error with the engine's own secrets masked in its detail: an upstream may
        echo the key it was sent ("Incorrect API key provided: sk-..."), and the detail
        goes to the log and into the session's record of the call."""
        info = self.info
        if info.detail is None:
            return self
        detail = info.detail
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET:
                detail = detail.replace(secret, "***")
        if detail == info.detail:
            return self
        return EngineError(
            info.status,
            info.code,
            info.message,
            retryable=info.retryable,
            retry_after=info.retry_after,
            detail=detail,
        )


# Shorter "secrets" (a placeholder key such as "x") are not masked: every word would go.
MIN_SECRET = 8


class Engine(Protocol):
    name: str

    async def generate(
        self,
        model: str,
        messages: list[ChatMessage],
        params: dict[str, Any],
        on_delta: DeltaSink | None,
        output: EngineOutput,
    ) -> None:
        """Generate into `output`, calling on_delta per text piece when streaming.

        Filling a caller-owned output (rather than returning one) keeps what was
        produced before a failure or a cancellation.
        """
        ...

    async def aclose(self) -> None: ...
