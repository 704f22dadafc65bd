"""What the session actor and its front share: the context of a worker's actors, helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import msgspec
from nats.aio.client import Client

from actors import session
from actors.errors import SessionNotFound
from actors.leases import Leases
from actors.metrics import WorkerMetrics
from actors.tools.builtin import Tool
from bus.signals import Signals
from config import Config
from contracts.errors import ErrorInfo, error_info
from contracts.session import TurnDone, TurnError
from eventstore.snapshots import SnapshotStore
from eventstore.store import EventStore, StoredEvent
from eventstore.tombstones import TombstoneLog

__all__ = ["FOLD_IN_THREAD_AT", "SessionContext", "fold_stored"]

# Events folded on the event loop at most; more (a long session's activation) fold
# in a thread, so that other sessions' requests keep being served meanwhile: each
# completed turn copies the history, so a session of 100 turns of 2,048 messages
# took 160 ms to fold (decoding its log another 80 ms, in pages between reads).
FOLD_IN_THREAD_AT = 64


class SessionContext(msgspec.Struct, kw_only=True):
    """What every session actor of a worker shares."""

    nc: Client
    store: EventStore
    config: Config
    # Where turns hear that their client went away (one subscription for all of them).
    signals: Signals
    # The turns this worker runs, and the question asked of another lease's holder.
    leases: Leases
    tombstones: TombstoneLog | None = None
    # Where sessions keep snapshots to activate from (actors/snapshots.py); None: none.
    snapshots: SnapshotStore | None = None
    # Every tool a pipeline may name (their schemas go to the model; the tool actor runs them).
    tools: dict[str, Tool] = {}
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    # Fallbacks and retries are counted here (model calls by the model actor).
    metrics: WorkerMetrics | None = None


async def fold_stored(
    state: session.SessionState, stored: Sequence[StoredEvent]
) -> session.SessionState:
    """`state` after the stored events, folded off the event loop when they are many."""
    events = [s.event for s in stored]
    if len(events) >= FOLD_IN_THREAD_AT:
        return await asyncio.to_thread(session.fold, events, state)
    return session.fold(events, state)


def _outcome_message(outcome: session.TurnOutcome) -> TurnDone | TurnError:
    """A recorded outcome, as it was first answered."""
    if outcome.error is not None:
        return TurnError(error=outcome.error, content=outcome.content)
    if outcome.status == "cancelled":
        error = error_info(499, "turn_cancelled", "This request was cancelled by its client.")
        return TurnError(error=error, content=outcome.content)
    return TurnDone(
        content=outcome.content,
        finish_reason=outcome.finish_reason,
        usage=outcome.usage,
        tool_calls=list(outcome.tool_calls),
    )


def _not_found(session_id: str) -> ErrorInfo:
    # The same words as actors.session's refusal: a foreign session looks like a missing one.
    return error_info(404, SessionNotFound.code, f"No session found with id '{session_id}'.")
