"""The session service's front: what reaches a session actor's mailbox, and what does not.

Every session command passes here first (the runtime's screen, bus/runtime.py):

- Sessions are keyed by (tenant, session id) (bus/subjects.py): another tenant's
  session of the same id is another key, whose log is empty, so it is simply free.
- A new session's first turn goes to its actor at once; so does a turn on a name the
  tenant has no session of (its actor opens it, or refuses a deleted one).
- A turn on an existing session needs it to be the caller's: a live actor's state says
  so without I/O, otherwise the log's first event (SessionOpened) does. A key pinned to
  one user is refused another user's session of its tenant, as if it did not exist.
- Reads and deletions need an existing session of the caller's. A missing one is
  refused here after one read of the log: it never activates an actor (a probe of
  random ids costs no memory) and never waits in a mailbox.
- Reads (metadata, messages, memory search) answer from the live actor's state plus
  whatever the log holds after it, without queuing behind a running turn.
- A deletion cancels the session's running turn, then takes its place in the mailbox.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, assert_never

import structlog
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.micro.request import Request

from actors import session
from actors._session_common import (
    SessionContext,
    _not_found,
    fold_stored,
)
from actors.memory.actor import ask_recall
from actors.session_actor import SessionActor
from actors.turn_trace import turn_traces
from bus.codec import DecodeError
from bus.runtime import Actor, ActorHost, Envelope
from bus.subjects import InvalidToken, session_cancel, session_key
from contracts.errors import ErrorInfo, error_info
from contracts.memory import RecallRequest
from contracts.session import (
    CANCEL_CODEC,
    SESSION_COMMAND_CODEC,
    TURN_REPLY_CODEC,
    CancelRequest,
    DeleteSession,
    GetSession,
    MemoriesFound,
    SearchMemories,
    SessionView,
    StartTurn,
    TurnRejected,
)
from contracts.turns import MAX_TURNS_PAGE, GetTurns, TurnsFound
from eventstore.events import EventUnion, SessionOpened

__all__ = ["SessionFront"]

log = structlog.get_logger("veil.session")


class SessionFront:
    """The screen of the session actors' host; `attach` it before the host starts."""

    def __init__(self, ctx: SessionContext) -> None:
        self._ctx = ctx
        self._host: ActorHost | None = None

    def attach(self, host: ActorHost) -> None:
        self._host = host

    def screen(
        self, key: str, request: Request, actor: Actor | None
    ) -> Envelope | Coroutine[Any, Any, None]:
        try:
            command = SESSION_COMMAND_CODEC.decode(request.data)
        except DecodeError as error:
            return _refuse(request, error_info(400, "bad_command", f"bad command: {error}"))
        try:
            matches = session_key(command.tenant, command.session_id) == key
        except InvalidToken:
            matches = False
        if not matches:
            return _refuse(
                request, error_info(400, "bad_command", "session id does not match subject")
            )
        live = actor if isinstance(actor, SessionActor) else None
        match command:
            case StartTurn(new_session=True):
                return Envelope(request, command)
            case StartTurn():
                user = command.user_id if command.user_bound else None
                if live is not None and live.owned_by(command.tenant, user):
                    return Envelope(request, command)  # the common case: no I/O, no task
                return self._admit(key, request, command)
            case DeleteSession():
                return self._delete(key, request, command, live)
            case GetSession() | SearchMemories():
                return self._read(request, command, live)
            case GetTurns():
                return self._turns(request, command, live)
            case _:
                assert_never(command)

    async def _admit(self, key: str, request: Request, command: StartTurn) -> None:
        """A turn on a name the tenant has no session of goes on (its actor opens it); on
        an existing session, only if it is the caller's."""
        user = command.user_id if command.user_bound else None
        first = await self._ctx.store.first(command.tenant, command.session_id)
        if first is not None and not _opened_for(first.event, command.tenant, user):
            await _refuse(request, _not_found(command.session_id))
            return
        self._deliver(key, Envelope(request, command))

    async def _delete(
        self, key: str, request: Request, command: DeleteSession, live: SessionActor | None
    ) -> None:
        state = await self._state(command.tenant, command.session_id, command.user, live)
        if state is None:
            await _refuse(request, _not_found(command.session_id))
            return
        if state.open_turn is not None:
            # Forgetting does not wait for the running turn's answer: it stops it.
            subject = session_cancel(command.tenant, command.session_id, state.open_turn.turn_id)
            await self._ctx.nc.publish(
                subject, CANCEL_CODEC.encode(CancelRequest(reason="session_deleted"))
            )
        self._deliver(key, Envelope(request, command))

    async def _read(
        self,
        request: Request,
        command: GetSession | SearchMemories,
        live: SessionActor | None,
    ) -> None:
        sid = command.session_id
        state = await self._state(command.tenant, sid, command.user, live)
        if state is None:
            await _refuse(request, _not_found(sid))
            return
        if isinstance(command, GetSession):
            await request.respond(TURN_REPLY_CODEC.encode(_view(sid, state, command.messages)))
            return
        ask = RecallRequest(
            tenant=command.tenant,
            session_id=sid,
            user_id=state.user_id,
            query=command.query,
            k=command.k,
        )
        try:
            found = await ask_recall(self._ctx.nc, ask, timeout=10)
        except NoRespondersError:
            message = "Long-term memory is not running."
            await _refuse(request, error_info(503, "memory_unavailable", message))
            return
        except NatsTimeout:
            message = "Long-term memory did not answer in time."
            await _refuse(request, error_info(504, "timeout", message))
            return
        await request.respond(TURN_REPLY_CODEC.encode(MemoriesFound(hits=found)))

    async def _owned_in_log(self, tenant: str, sid: str, user: str | None) -> bool:
        """Whether the log's first event opens this session for `tenant` (and `user`, for
        a caller pinned to one): one read."""
        first = await self._ctx.store.first(tenant, sid)
        return first is not None and _opened_for(first.event, tenant, user)

    async def _state(
        self, tenant: str, sid: str, user: str | None, live: SessionActor | None
    ) -> session.SessionState | None:
        """The session's current state if it exists and is the caller's: the live actor's
        state and what the log holds after it, or the whole log. The actor is never
        changed."""
        if live is not None and live.owned_by(tenant, user):
            state, seq = live.snapshot()
        elif await self._owned_in_log(tenant, sid, user):
            if self._ctx.tombstones is not None and await self._ctx.tombstones.get(tenant, sid):
                return None  # a deletion cut short: its actor finishes it when next activated
            state, seq = session.initial(), 0
        else:
            return None
        state = await fold_stored(state, await self._ctx.store.load(tenant, sid, after=seq))
        return state if session.owned(state, tenant, user) else None

    async def _turns(self, request: Request, command: GetTurns, live: SessionActor | None) -> None:
        """Turn traces come from the log itself, never from the folded state."""
        tenant, sid = command.tenant, command.session_id
        if await self._state(tenant, sid, command.user, live) is None:
            await _refuse(request, _not_found(sid))
            return
        stored = await self._ctx.store.load(tenant, sid)
        traces = turn_traces(
            (s.event for s in stored), details=command.details, content=command.content
        )
        if command.turn_id is not None:
            traces = [t for t in traces if t.turn_id == command.turn_id]
            if not traces:
                message = f"No turn found with id '{command.turn_id}' in this session."
                await _refuse(request, error_info(404, "turn_not_found", message))
                return
            await request.respond(TURN_REPLY_CODEC.encode(TurnsFound(turns=traces)))
            return
        if command.after is not None:
            ids = [t.turn_id for t in traces]
            if command.after not in ids:
                message = f"No turn found with id '{command.after}' in this session."
                await _refuse(request, error_info(400, "invalid_cursor", message))
                return
            traces = traces[ids.index(command.after) + 1 :]
        limit = max(1, min(command.limit, MAX_TURNS_PAGE))
        page = TurnsFound(turns=traces[:limit], has_more=len(traces) > limit)
        await request.respond(TURN_REPLY_CODEC.encode(page))

    def _deliver(self, key: str, envelope: Envelope) -> None:
        assert self._host is not None, "attach the front to its host first"
        self._host.deliver(key, envelope)


def _opened_for(event: EventUnion, tenant: str, user: str | None) -> bool:
    """Whether a log's first event opens the session for `tenant` (and `user`, if given)."""
    return (
        isinstance(event, SessionOpened)
        and event.tenant == tenant
        and (user is None or event.user_id == user)
    )


def _view(session_id: str, state: session.SessionState, messages: bool) -> SessionView:
    assert state.created_at is not None and state.updated_at is not None
    return SessionView(
        session_id=session_id,
        created_at=state.created_at,
        updated_at=state.updated_at,
        turns=state.turns,
        usage=state.usage,
        model=state.open_turn.model if state.open_turn else state.last_model,
        messages=list(state.history) if messages else None,
    )


async def _refuse(request: Request, error: ErrorInfo) -> None:
    await request.respond(TURN_REPLY_CODEC.encode(TurnRejected(error=error)))
