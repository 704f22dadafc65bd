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
- What enters a mailbox is bounded (bus/runtime.py): past `[server]
  max_queued_per_session` waiting on one session, or `max_turns_in_flight` in this
  worker, a turn (or a conversation's change) is refused at once with a 503
  `server_is_overloaded` and a Retry-After, before any I/O. Reads are never refused by
  these bounds, and neither are deletions (they end work rather than add it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Coroutine
from typing import Any, assert_never

import msgspec
import structlog
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.micro.request import Request

from actors import session, snapshots
from actors._session_common import (
    SessionContext,
    _not_found,
    fold_stored,
)
from actors.memory.actor import ask_recall
from actors.session_actor import SessionActor
from actors.state_digest import state_digest
from actors.turn_trace import turn_traces
from bus.codec import DecodeError
from bus.requests import BUS_DOWN
from bus.runtime import Actor, ActorHost, Envelope, Overloaded
from bus.subjects import InvalidToken, session_cancel, session_key
from contracts.conversations import (
    AddItems,
    DeleteItem,
    DeleteResponse,
    OpenConversation,
    UpdateMetadata,
)
from contracts.errors import ErrorInfo, error_info, error_type
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
from eventstore.errors import StoreUnavailable
from eventstore.events import EventUnion, SessionOpened

__all__ = ["SessionFront"]

log = structlog.get_logger("veil.session")

# Seconds a refused turn is told to wait (Retry-After): about a short turn's length, so
# the OpenAI SDKs, which honour the header, come back once a slot may have freed.
OVERLOAD_RETRY_AFTER = 1.0


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
        admitted = self._screen(key, request, actor)
        if isinstance(admitted, Envelope):
            self._handed(admitted)
            return admitted
        return _log_guarded(request, admitted)

    def _handed(self, envelope: Envelope) -> None:
        # A turn entering the mailbox: a gateway asking where it is hears "here" until
        # it is answered (SessionActor.receive, or `overloaded` when a bound refuses it).
        if isinstance(envelope.message, StartTurn):
            self._ctx.leases.hand(envelope.message.turn_id)

    def _screen(
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
            case OpenConversation():
                return Envelope(request, command)  # a new id, as a new session's first turn
            case AddItems() | DeleteItem() | UpdateMetadata() | DeleteResponse():
                return self._edit(key, request, command, live)
            case _:
                assert_never(command)

    async def overloaded(self, request: Request, refusal: Overloaded) -> None:
        """The answer to a turn a bound refused (the host's `overloaded`)."""
        with contextlib.suppress(DecodeError):
            command = SESSION_COMMAND_CODEC.decode(request.data)
            if isinstance(command, StartTurn):
                self._ctx.leases.drop(command.turn_id)
        if self._ctx.metrics is not None:
            self._ctx.metrics.refused("veil-session", refusal.bound)
        if refusal.bound == "mailbox":
            message = (
                f"Too many requests are waiting for this session (at most {refusal.limit} "
                "behind the running turn); try again shortly."
            )
        else:
            message = "The server is overloaded; try again shortly."
        log.warning("session.overloaded", bound=refusal.bound, limit=refusal.limit)
        error = ErrorInfo(
            status=503,
            type=error_type(503),
            code="server_is_overloaded",
            message=message,
            retryable=True,
            retry_after=OVERLOAD_RETRY_AFTER,
        )
        await _refuse(request, error)

    async def _admit(self, key: str, request: Request, command: StartTurn) -> None:
        """A turn on a name the tenant has no session of goes on (its actor opens it); on
        an existing session, only if it is the caller's."""
        assert self._host is not None, "attach the front to its host first"
        try:
            self._host.check(key)  # before the log is read for it
        except Overloaded as refusal:
            await self.overloaded(request, refusal)
            return
        user = command.user_id if command.user_bound else None
        first = await self._ctx.store.first(command.tenant, command.session_id)
        if first is not None and not _opened_for(first.event, command.tenant, user):
            await _refuse(request, _not_found(command.session_id))
            return
        await self._deliver(key, Envelope(request, command))

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
        await self._deliver(key, Envelope(request, command), bounded=False)

    async def _edit(
        self,
        key: str,
        request: Request,
        command: AddItems | DeleteItem | UpdateMetadata | DeleteResponse,
        live: SessionActor | None,
    ) -> None:
        """A conversation's change needs an existing session of the caller's; its actor
        makes it, in turn with the session's turns."""
        if await self._state(command.tenant, command.session_id, command.user, live) is None:
            await _refuse(request, _not_found(command.session_id))
            return
        await self._deliver(key, Envelope(request, command))

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
            view = _view(sid, state, command.messages)
            if command.digest:
                # The live actor's state plus the log after it: what a replay must rebuild.
                view = msgspec.structs.replace(view, state_digest=state_digest(state))
            await request.respond(TURN_REPLY_CODEC.encode(view))
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
        changed. Without a live actor, the session's snapshot spares the read the fold of
        its whole log; ownership is still judged by the log and the tombstones first."""
        if live is not None and live.owned_by(tenant, user):
            state, seq = live.snapshot()
            stored = await self._ctx.store.load(tenant, sid, after=seq)
        elif await self._owned_in_log(tenant, sid, user):
            if self._ctx.tombstones is not None and await self._ctx.tombstones.get(tenant, sid):
                return None  # a deletion cut short: its actor finishes it when next activated
            state, _, stored = await snapshots.restore(
                self._ctx.store, self._ctx.snapshots, tenant, sid
            )
        else:
            return None
        state = await fold_stored(state, stored)
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

    async def _deliver(self, key: str, envelope: Envelope, *, bounded: bool = True) -> None:
        assert self._host is not None, "attach the front to its host first"
        self._handed(envelope)
        try:
            self._host.deliver(key, envelope, bounded=bounded)
        except Overloaded as refusal:
            # The bounds were checked before the log was read; others came in meanwhile.
            await self.overloaded(envelope.request, refusal)


def _opened_for(event: EventUnion, tenant: str, user: str | None) -> bool:
    """Whether a log's first event opens the session for `tenant` (and `user`, if given)."""
    return (
        isinstance(event, SessionOpened)
        and event.tenant == tenant
        and (user is None or event.user_id == user)
    )


def _view(session_id: str, state: session.SessionState, messages: bool) -> SessionView:
    return session.session_view(session_id, state, messages)


async def _log_guarded(request: Request, work: Coroutine[Any, Any, None]) -> None:
    """A read of the log that cannot be made (a cluster electing a new leader, the bus
    down) is a 503 to retry, as in the actor: not an actor failure (a 500)."""
    try:
        await work
    except (StoreUnavailable, *BUS_DOWN) as error:
        log.warning("session.log_unavailable", subject=request.subject, error=repr(error))
        message = "The session log is unavailable; try again shortly."
        with contextlib.suppress(Exception):
            await _refuse(request, error_info(503, "service_unavailable", message))


async def _refuse(request: Request, error: ErrorInfo) -> None:
    await request.respond(TURN_REPLY_CODEC.encode(TurnRejected(error=error)))
