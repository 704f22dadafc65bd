"""What a session actor's parts share: the context of a worker's actors, and error helpers."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
from nats.aio.client import Client
from nats.micro.request import Request

from actors import session
from actors.errors import SessionNotFound
from actors.protocol import (
    ErrorInfo,
    TurnDone,
    TurnError,
)
from actors.tools.builtin import Tool
from bus.signals import Signals
from eventstore.events import EventUnion
from eventstore.store import EventStore
from eventstore.tombstones import TombstoneLog
from veil.config import Config

__all__ = ["SessionContext", "SessionPart"]


class SessionContext(msgspec.Struct, kw_only=True):
    """What every session actor of a worker shares."""

    nc: Client
    store: EventStore
    config: Config
    # Where turns hear that their client went away (one subscription for all of them).
    signals: Signals
    tombstones: TombstoneLog | None = None
    # Every tool a pipeline may name (their schemas go to the model; the tool actor runs them).
    tools: dict[str, Tool] = {}
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)


class SessionPart:
    """What SessionActor provides to the parts mixed into it (for the type checker)."""

    session_id: str
    _ctx: SessionContext
    _state: session.SessionState
    _erased: bool

    async def _append(
        self, command: session.Command, dedupe_id: str | None = None
    ) -> list[EventUnion]:
        raise NotImplementedError

    async def _reload(self) -> None:
        raise NotImplementedError

    async def _reject(self, request: Request, error: ErrorInfo) -> None:
        raise NotImplementedError


def _error(status: int, code: str, message: str) -> ErrorInfo:
    kind = "invalid_request_error" if status < 500 else "api_error"
    return ErrorInfo(status=status, type=kind, code=code, message=message)


def _outcome_message(outcome: session.TurnOutcome) -> TurnDone | TurnError:
    """A recorded outcome, as it was first answered."""
    if outcome.error is not None:
        return TurnError(error=outcome.error, content=outcome.content)
    if outcome.status == "cancelled":
        error = _error(499, "turn_cancelled", "This request was cancelled by its client.")
        return TurnError(error=error, content=outcome.content)
    return TurnDone(
        content=outcome.content,
        finish_reason=outcome.finish_reason,
        usage=outcome.usage,
        tool_calls=list(outcome.tool_calls),
    )


def _not_found(session_id: str) -> ErrorInfo:
    # The same words as actors.session's refusal: a foreign session looks like a missing one.
    return _error(404, SessionNotFound.code, f"No session found with id '{session_id}'.")
