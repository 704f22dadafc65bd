"""The session actor's shell: load, decide, append, then act and reply.

All I/O of a session lives here; the logic is in actors/session.py. One
instance per active session (a tenant and a session id) in a worker; the runtime
feeds it one request at a time, so turns of one session run one after the other.
Across workers, the append's expected sequence and the turn lease keep a single
writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import assert_never

import structlog
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.micro.request import Request

from actors import session, snapshots, turn
from actors._session_common import SessionContext, _not_found, _outcome_message, fold_stored
from actors.errors import ActorError, AlreadyHandled, RequestAbandoned, TurnInProgress
from actors.memory.actor import ask_forget
from actors.turn_effects import TurnEffects
from bus import telemetry
from bus.codec import DecodeError
from bus.requests import BUS_DOWN
from bus.runtime import Envelope
from bus.subjects import session_cancel, session_out, split_session_key
from config import ModelConfig
from contracts.conversations import (
    AddItems,
    ConversationEdit,
    DeleteItem,
    DeleteResponse,
    OpenConversation,
    UpdateMetadata,
)
from contracts.errors import ErrorInfo, error_info
from contracts.memory import ForgetRequest
from contracts.session import (
    OUTPUT_CODEC,
    TURN_REPLY_CODEC,
    DeleteSession,
    SessionDeleted,
    StartTurn,
    TurnAccepted,
    TurnDone,
    TurnError,
    TurnRejected,
)
from eventstore.errors import ConcurrencyConflict, EventStoreError, StoreUnavailable
from eventstore.events import EventUnion, TurnFailed, TurnStarted
from eventstore.store import StoredEvent
from eventstore.tombstones import Tombstone

__all__ = ["SessionActor", "SessionContext"]

log = structlog.get_logger("veil.session")

# Appends that keep conflicting mean a writer is fighting us; give up after this many.
MAX_CONFLICTS = 20
# While another worker's turn holds the session, ask it this often whether it still runs.
PROBE_EVERY = 2.0
FORGET_TIMEOUT = 10.0
GONE_BEFORE_START = "The client went away before the turn could start."

# What the front hands to a session's mailbox: turns, deletions, conversation changes.
Mailed = StartTurn | DeleteSession | ConversationEdit
_MAILED = (
    StartTurn,
    DeleteSession,
    OpenConversation,
    AddItems,
    DeleteItem,
    UpdateMetadata,
    DeleteResponse,
)


class SessionActor:
    def __init__(self, key: str, ctx: SessionContext) -> None:
        """The actor of the session whose session_key (bus/subjects.py) is `key`."""
        self.tenant, self.session_id = split_session_key(key)
        self._ctx = ctx
        self._effects = TurnEffects(ctx.nc, model_timeout=ctx.config.server.turn_timeout)
        self._state = session.initial()
        self._last_seq = 0
        self._loaded = False
        # True while the state is assumed empty rather than read (a session just minted).
        self._assumed_new = False
        # The session was deleted: its id stays unused.
        self._erased = False
        # Work that records into the log after its turn, off the mailbox (fact extraction):
        # it and the mailbox's turns write one at a time.
        self._after: set[asyncio.Task[None]] = set()
        self._writing = asyncio.Lock()
        # Events folded into the state since the last snapshot, and the snapshot being
        # written (one at a time, off the turn's path).
        self._unsnapshotted = 0
        self._snapshotting: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        if self._after:
            await asyncio.gather(*self._after, return_exceptions=True)
        if self._snapshotting is not None:
            await asyncio.gather(self._snapshotting, return_exceptions=True)

    async def _reload(self) -> None:
        async with self._writing:
            await self._catch_up()

    async def _catch_up(self) -> None:
        """Catch up with the log: everything after what this actor has seen."""
        # A deletion that was cut short after its tombstone: finish it first.
        if (
            not self._loaded
            and self._ctx.tombstones is not None
            and await self._ctx.tombstones.get(self.tenant, self.session_id) is not None
        ):
            await self._ctx.store.erase(self.tenant, self.session_id)
            await self._forget_snapshot()
            self._loaded = self._erased = True
            return
        if self._last_seq == 0:
            # Nothing read yet (the state is the initial one): start from a snapshot if any.
            self._state, self._last_seq, stored = await snapshots.restore(
                self._ctx.store, self._ctx.snapshots, self.tenant, self.session_id
            )
        else:
            stored = await self._ctx.store.load(self.tenant, self.session_id, after=self._last_seq)
        await self._fold_in(stored)
        self._loaded = True

    async def _fold_in(self, stored: list[StoredEvent]) -> None:
        """Fold events read from the log into the state, up to the last one's position."""
        if stored:
            self._state = await fold_stored(self._state, stored)
            self._last_seq = stored[-1].seq
            self._unsnapshotted += len(stored)

    def owned_by(self, tenant: str, user: str | None = None) -> bool:
        """Whether this actor's state (once read) shows `tenant`'s (and `user`'s) session."""
        return self._loaded and session.owned(self._state, tenant, user)

    def snapshot(self) -> tuple[session.SessionState, int]:
        """The state as of a log position, for reads that must not wait for the mailbox."""
        return self._state, self._last_seq

    async def _append(
        self, command: session.Command, dedupe_id: str | None = None
    ) -> list[EventUnion]:
        """Decide and append, reloading and deciding again on a conflict."""
        async with self._writing:
            return await self._append_now(command, dedupe_id)

    async def _append_now(
        self, command: session.Command, dedupe_id: str | None
    ) -> list[EventUnion]:
        for _ in range(MAX_CONFLICTS):
            events = session.decide(self._state, command)
            if not events:
                return events
            try:
                appended = await self._ctx.store.append(
                    self.tenant,
                    self.session_id,
                    events,
                    expected_last_seq=self._last_seq,
                    # Unread state must not take stored duplicates for its own append: it
                    # conflicts instead, reloads, and then sees the command as handled.
                    dedupe_id=None if self._assumed_new else dedupe_id,
                )
            except ConcurrencyConflict:
                self._assumed_new = False
                await self._catch_up()
                continue
            self._assumed_new = False
            if appended.reused:
                # An earlier try (its acknowledgement lost) stored part of the batch, with
                # its own clock: fold the log's copies, not this decision's.
                return await self._read_back(appended)
            self._last_seq = int(appended)
            for event in events:
                self._state = session.evolve(self._state, event)
            self._unsnapshotted += len(events)
            self._snapshot_later()
            return events
        raise ConcurrencyConflict(self.session_id, self._last_seq)

    async def _read_back(self, appended: int) -> list[EventUnion]:
        """Catch up with the log through an append; the batch's events as stored."""
        stored = await self._ctx.store.load(self.tenant, self.session_id, after=self._last_seq)
        await self._fold_in(stored)
        self._snapshot_later()
        return [s.event for s in stored if s.seq <= appended]

    def _snapshot_later(self) -> None:
        """Every SNAPSHOT_EVERY events, write a snapshot in a task of its own: the turn
        goes on meanwhile, and a lost write costs the next activation a longer fold."""
        if (
            self._ctx.snapshots is None
            or self._unsnapshotted < snapshots.SNAPSHOT_EVERY
            or self._snapshotting is not None
        ):
            return
        self._unsnapshotted = 0
        task = asyncio.create_task(self._write_snapshot(self._state, self._last_seq))
        self._snapshotting = task
        task.add_done_callback(self._snapshot_written)

    def _snapshot_written(self, task: asyncio.Task[None]) -> None:
        if self._snapshotting is task:
            self._snapshotting = None

    async def _write_snapshot(self, state: session.SessionState, seq: int) -> None:
        store = self._ctx.snapshots
        assert store is not None
        # The state is immutable: encoding it in a thread leaves the event loop to turns.
        data = await asyncio.to_thread(snapshots.encode, self.tenant, self.session_id, seq, state)
        if not self._erased:
            await store.put(self.tenant, self.session_id, data)

    async def _forget_snapshot(self) -> None:
        """Delete the session's snapshot, after any write of one still under way."""
        pending = self._snapshotting
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        self._unsnapshotted = 0
        if self._ctx.snapshots is not None:
            await self._ctx.snapshots.delete(self.tenant, self.session_id)

    async def receive(self, envelope: Envelope) -> None:
        """A command the front admitted (actors/session_front.py): a turn or a deletion."""
        request, command = envelope.request, envelope.message
        if not isinstance(command, _MAILED):
            await self._reject(request, error_info(400, "bad_command", "not a mailbox command"))
            return
        headers = request.headers
        # Its log lines say whose work this is (bound here, reset after: the actor's task
        # serves the next command too); its spans continue the gateway's trace.
        bound = structlog.contextvars.bind_contextvars(**_log_context(command))
        try:
            with (
                telemetry.serving(telemetry.request_id(headers), telemetry.incoming(headers)),
                telemetry.span(_span_name(command), kind=telemetry.SpanKind.SERVER) as span,
            ):
                if span is not None:
                    span.set_attributes(_span_attributes(command))
                await self._receive(request, command)
        finally:
            structlog.contextvars.reset_contextvars(**bound)
            if isinstance(command, StartTurn):
                self._ctx.leases.drop(command.turn_id)  # answered (see SessionFront._handed)

    async def _receive(self, request: Request, command: Mailed) -> None:
        try:
            await self._handle(request, command)
        except (StoreUnavailable, *BUS_DOWN) as error:
            # The log or the model is out of reach (the bus is down): "try again", not an
            # actor failure (whose traceback, logged by the thousand, would stall the loop).
            # What this actor holds may be behind the log now: read it again next time.
            log.warning("session.bus_unavailable", session=self.session_id, error=repr(error))
            self._state, self._last_seq, self._loaded = session.initial(), 0, False
            self._unsnapshotted = 0
            message = "The session log is unavailable; try again shortly."
            with contextlib.suppress(Exception):
                await self._reject(request, error_info(503, "service_unavailable", message))

    async def _handle(self, request: Request, command: Mailed) -> None:
        if not self._loaded:
            if isinstance(command, StartTurn) and command.new_session and command.random_id:
                # An id the gateway just drew has no log and no tombstone: start from the
                # empty state. The first append expects an empty log, so a session that is
                # not new after all conflicts and reloads.
                self._loaded = self._assumed_new = True
            else:
                await self._reload()
        if isinstance(command, StartTurn) and self._erased:
            # A deleted session never opens again under its id, whoever names it.
            if command.new_session:
                # A first turn retried under its Idempotency-Key after the deletion.
                message = "The session this request opened has been deleted; send it again with a new Idempotency-Key."
                await self._reject(request, error_info(409, "session_deleted", message))
            else:
                await self._reject(request, _not_found(self.session_id))
            return
        match command:
            case StartTurn():
                await self._start_turn(request, command)
            case DeleteSession():
                await self._delete(request, command)
            case (
                OpenConversation() | AddItems() | DeleteItem() | UpdateMetadata() | DeleteResponse()
            ):
                await self._edit(request, command)
            case _:
                assert_never(command)

    async def _edit(self, request: Request, command: ConversationEdit) -> None:
        """A conversation changed without a turn (contracts/conversations.py); the reply
        is the session after the change."""
        if self._erased:
            await self._reject(request, _not_found(self.session_id))
            return
        try:
            await self._append(session.Edit(edit=command, now=self._ctx.clock()))
        except ActorError as refusal:
            error = error_info(refusal.status, refusal.code, str(refusal), refusal.param)
            await self._reject(request, error)
            return
        view = session.session_view(self.session_id, self._state, messages=False)
        await request.respond(TURN_REPLY_CODEC.encode(view))

    async def _start_turn(self, request: Request, start: StartTurn) -> None:
        refusal = turn.admit(self._ctx.config, start)
        if refusal is not None:
            await self._reject(request, refusal)
            return
        model = self._ctx.config.model(start.model)
        assert model is not None  # admitted
        if self._ctx.signals.fired(session_cancel(self.tenant, self.session_id, start.abandon_id)):
            # Its client gave up while it waited for the session: it never starts.
            await self._reject(request, error_info(499, "client_gone", GONE_BEFORE_START))
            return
        with self._ctx.leases.holding(start.turn_id):
            await self._hold_turn(request, start, model)

    async def _hold_turn(self, request: Request, start: StartTurn, model: ModelConfig) -> None:
        """Open and run the turn while this worker answers that it holds its lease."""
        out = session_out(self.tenant, self.session_id, start.turn_id)
        finish = self._finisher(request, start, out)
        try:
            await self._open(start, turn.only_pipeline(model))
        except AlreadyHandled as handled:
            if start.stream:
                running = self._state.open_turn if handled.outcome is None else None
                accepted = TurnAccepted(
                    turn_id=handled.turn_id,
                    replay=True,
                    holder=running.holder if running is not None else None,
                )
                await request.respond(TURN_REPLY_CODEC.encode(accepted))
            if handled.outcome is not None:
                await finish(_outcome_message(handled.outcome))
            elif not start.stream:
                await self._reject(
                    request, error_info(409, "in_progress", "The same request is still running.")
                )
            return
        except ActorError as refusal:
            error = error_info(refusal.status, refusal.code, str(refusal), refusal.param)
            await self._reject(request, error)
            return
        if start.stream:
            accepted = TurnAccepted(turn_id=start.turn_id, holder=self._ctx.leases.worker_id)
            await request.respond(TURN_REPLY_CODEC.encode(accepted))
        try:
            await self._run_turn(start, model, finish)
        except (StoreUnavailable, *BUS_DOWN):
            # The log went out of reach mid-turn: say so to a stream that waits on the
            # turn's output (a request's reply is the caller's 503, sent by _receive).
            if start.stream:
                message = "The session log became unavailable mid-turn; retry the request."
                with contextlib.suppress(Exception):
                    await finish(TurnError(error=error_info(503, "service_unavailable", message)))
            raise

    def _finisher(
        self, request: Request, start: StartTurn, out: str
    ) -> Callable[[TurnDone | TurnError], Awaitable[None]]:
        """Where a turn's result goes: the stream's output subject, or the request's reply."""

        async def publish(message: TurnDone | TurnError) -> None:
            await self._ctx.nc.publish(out, OUTPUT_CODEC.encode(message))

        async def reply(message: TurnDone | TurnError) -> None:
            await request.respond(TURN_REPLY_CODEC.encode(message))

        return publish if start.stream else reply

    async def _open(self, start: StartTurn, pipeline: str | None) -> None:
        """Append TurnStarted, waiting while another writer's turn holds the lease.

        While it waits it asks the lease's holder every PROBE_EVERY seconds whether it
        still runs that turn: a dead holder frees the session at once. A request whose
        client gives up meanwhile stops waiting and never starts.
        """
        cancel = session_cancel(self.tenant, self.session_id, start.abandon_id)
        holder = self._ctx.leases.worker_id
        fresh = False
        gone: str | None = None
        while True:
            now = self._ctx.clock()
            lease = now + timedelta(seconds=self._ctx.config.server.turn_timeout)
            command = session.OpenTurn(
                start=start,
                now=now,
                lease_until=lease,
                pipeline=pipeline,
                holder=holder,
                holder_gone=gone,
            )
            try:
                # The store drops a second append under one id: running a lost turn again
                # appends under an id of its own (the same for every worker doing it from
                # this position, so only one of them does).
                dedupe = start.command_id
                if gone == start.turn_id:
                    dedupe = f"{start.command_id}.after.{self._last_seq}"
                events = await self._append(command, dedupe_id=dedupe)
            except TurnInProgress as busy:
                if self._ctx.signals.fired(cancel):
                    raise RequestAbandoned(GONE_BEFORE_START) from None
                runs = (
                    await self._ctx.leases.holder_runs(busy.holder, busy.turn_id)
                    if busy.holder is not None
                    else None
                )
                if runs is False:
                    log.warning(
                        "session.holder_gone",
                        session=self.session_id,
                        turn=busy.turn_id,
                        holder=busy.holder,
                    )
                    gone = busy.turn_id
                    continue
                log.info("session.waiting", session=self.session_id, busy_turn=busy.turn_id)
                probe_at = self._ctx.clock() + timedelta(seconds=PROBE_EVERY)
                await self._wait_for_change(min(busy.lease_until, probe_at), cancel)
                await self._reload()
            except AlreadyHandled as handled:
                if handled.outcome is not None or gone == handled.turn_id:
                    raise
                # A retry of a turn that is still open: run it again if the worker that
                # held it is gone (asked on a state that is up to date), else wait on it.
                if not fresh:
                    await self._reload()
                    fresh = True
                    continue
                open_turn = self._state.open_turn
                if open_turn is None or open_turn.holder is None:
                    raise
                # This worker holding it means it no longer runs: its turns run in this
                # actor's mailbox, which is busy with this retry (and the lease set
                # counts the retry itself).
                if (
                    open_turn.holder != self._ctx.leases.worker_id
                    and await self._ctx.leases.holder_runs(open_turn.holder, handled.turn_id)
                    is not False
                ):
                    raise
                log.warning(
                    "session.holder_gone",
                    session=self.session_id,
                    turn=handled.turn_id,
                    holder=open_turn.holder,
                )
                gone = handled.turn_id
                continue
            except ActorError:
                # Another worker may have moved the session on since this actor
                # last read it: refuse only on a state that is up to date.
                if fresh:
                    raise
                await self._reload()
            else:
                other = _started_elsewhere(events, start.turn_id, holder)
                if other is not None:
                    # An earlier try of this request on another worker stored the turn's
                    # start (its acknowledgement lost, or this retry came while it runs).
                    # The log names that worker: wait on it while it runs the turn, else
                    # close that start, as for a worker gone, and run it here.
                    if await self._ctx.leases.holder_runs(other, start.turn_id) is not False:
                        raise AlreadyHandled(start.turn_id, None)
                    log.warning(
                        "session.holder_gone",
                        session=self.session_id,
                        turn=start.turn_id,
                        holder=other,
                    )
                    gone = start.turn_id
                    continue
                lost = [e for e in events if isinstance(e, TurnFailed) and e.code == "worker_lost"]
                for failed in lost:
                    if failed.turn_id != start.turn_id:  # else it runs again, for its waiters
                        await self._tell_lost(failed)
                return
            fresh = True

    async def _tell_lost(self, failed: TurnFailed) -> None:
        """A gateway still streaming the lost turn hears that it ended, instead of timing out."""
        error = error_info(failed.status, failed.code, failed.message)
        with contextlib.suppress(Exception):
            await self._ctx.nc.publish(
                session_out(self.tenant, self.session_id, failed.turn_id),
                OUTPUT_CODEC.encode(TurnError(error=error)),
            )

    async def _wait_for_change(self, until: datetime, cancel: str) -> None:
        """Sleep until the session's log grows, `until` comes, or the request is cancelled."""
        changed = asyncio.Event()

        async def on_event(_: Msg) -> None:
            changed.set()

        log_subject = await self._ctx.store.subject(self.tenant, self.session_id)
        unwatch = await self._ctx.signals.watch(cancel, changed.set)
        sub = await self._ctx.nc.subscribe(log_subject, cb=on_event)
        try:
            # Check once after subscribing: the turn may have ended in between.
            if await self._ctx.store.last_seq(self.tenant, self.session_id) != self._last_seq:
                return
            timeout = max(0.0, (until - self._ctx.clock()).total_seconds()) + 0.05
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await changed.wait()
        finally:
            unwatch()
            await sub.unsubscribe()

    async def _run_turn(
        self,
        start: StartTurn,
        model: ModelConfig,
        finish: Callable[[TurnDone | TurnError], Awaitable[None]],
    ) -> None:
        """Run the turn's workflow (actors/turn.py): record what it decides, run its effects."""
        config = self._ctx.config
        setup = turn.TurnSetup(
            start=start,
            model=model,
            pipelines=config.pipelines,
            tool_schemas={name: tool.schema() for name, tool in self._ctx.tools.items()},
            memory_enabled=config.memory.enabled,
        )
        cancelled = asyncio.Event()
        unwatch = await self._ctx.signals.watch(
            session_cancel(self.tenant, self.session_id, start.turn_id), cancelled.set
        )
        try:
            step = turn.begin(self._state, setup, self._ctx.clock())
            while step.effect is not None:
                await self._record(start.turn_id, step.events)
                self._count(step)
                seen = await self._effects.run(step.effect, cancelled)
                step = turn.advance(
                    self._state, step.progress, seen, self._ctx.clock(), cancelled.is_set()
                )
        finally:
            unwatch()
        await self._record(start.turn_id, step.events)
        if isinstance(step.reply, TurnError) and self._never_given_out(start):
            await self._discard(start, step.reply)
        if step.reply is not None:
            await finish(step.reply)
        _turn_ended(start, step)
        if step.after is not None:
            # After the reply, and off the mailbox: the session's next turn does not wait.
            task = asyncio.create_task(self._extract_facts(start.turn_id, step.after))
            self._after.add(task)
            task.add_done_callback(self._after.discard)

    def _count(self, step: turn.Step) -> None:
        """A retry or a fallback the workflow chose, for the metrics."""
        metrics, effect, progress = self._ctx.metrics, step.effect, step.progress
        if metrics is None or not isinstance(effect, turn.CallModel) or progress.phase != "reply":
            return
        if progress.attempt > 0:
            metrics.retry(progress.pipeline, effect.link.engine)
        elif progress.link > 0:
            metrics.fallback(progress.pipeline, effect.link.engine)

    def _never_given_out(self, start: StartTurn) -> bool:
        """A new session whose only turn failed without its client learning the id: an
        error answer carries no session id (a stream's does, in its headers)."""
        state = self._state
        return start.new_session and not start.stream and state.turns == 1 and not state.history

    async def _discard(self, start: StartTurn, reply: TurnError) -> None:
        """Leave nothing of a session nobody can name: its client's retries (the SDKs
        retry a 502 by themselves) would otherwise leave one orphan each."""
        log.warning(
            "session.first_turn_failed",
            session=self.session_id,
            status=reply.error.status,
            code=reply.error.code,
            message=reply.error.message,
        )
        async with self._writing:
            await self._ctx.store.erase(self.tenant, self.session_id)
            await self._forget_snapshot()
            self._state, self._last_seq = session.initial(), 0
        if start.random_id:
            # What memory may have indexed of it goes too (an id drawn at random is never
            # used again; one derived from an Idempotency-Key is, by the retry).
            await self._forget_memories(start.tenant)

    async def _record(self, turn_id: str, events: list[EventUnion]) -> None:
        if events:
            await self._append(session.Record(turn_id=turn_id, events=tuple(events)))

    async def _extract_facts(self, turn_id: str, extraction: turn.CallModel) -> None:
        try:
            seen = await self._effects.run(extraction, asyncio.Event())
            assert isinstance(seen, turn.ModelAnswered)
            events = turn.facts_recorded(turn_id, seen.result, self._ctx.clock())
            record = session.Record(turn_id=turn_id, events=tuple(events), after_turn=True)
            await self._append(record)
        except (EventStoreError, *BUS_DOWN) as error:  # nobody waits for it: log it
            log.warning("session.facts_failed", session=self.session_id, error=repr(error))

    async def _delete(self, request: Request, command: DeleteSession) -> None:
        """Forget the session: its events, its memories, and a tombstone that outlives them."""
        # Work still to record for an earlier turn is dropped: nothing may outlive the erase.
        for task in self._after:
            task.cancel()
        await self.stop()
        await self._reload()
        if not self.owned_by(command.tenant, command.user):
            await self._reject(request, _not_found(self.session_id))
            return
        # The tombstone first: if we stop halfway, the next activation finishes the job.
        if self._ctx.tombstones is not None:
            await self._ctx.tombstones.record(
                Tombstone(
                    session_id=self.session_id,
                    tenant=command.tenant,
                    deleted_by=command.key_id,
                    at=self._ctx.clock(),
                )
            )
        erased = await self._ctx.store.erase(self.tenant, self.session_id)
        await self._forget_snapshot()
        memories = await self._forget_memories(command.tenant)
        self._state, self._last_seq, self._erased = session.initial(), 0, True
        log.info("session.deleted", session=self.session_id, events=erased, memories=memories)
        reply = SessionDeleted(
            session_id=self.session_id, events_erased=erased, memories_erased=memories
        )
        await request.respond(TURN_REPLY_CODEC.encode(reply))

    async def _forget_memories(self, tenant: str) -> int:
        """Drop the session's memories now; the memory actor's tombstone check covers outages."""
        forget = ForgetRequest(tenant=tenant, session_id=self.session_id)
        try:
            return await ask_forget(self._ctx.nc, forget, timeout=FORGET_TIMEOUT)
        except (NoRespondersError, NatsTimeout, DecodeError):
            return 0

    async def _reject(self, request: Request, error: ErrorInfo) -> None:
        span = telemetry.current_span()
        if span is not None:
            span.set_attribute("veil.refusal", error.code)
            if error.status >= 500:
                telemetry.failed(span, error.code)
        await request.respond(TURN_REPLY_CODEC.encode(TurnRejected(error=error)))


def _log_context(command: Mailed) -> dict[str, str]:
    context = {
        "session_id": command.session_id,
        "tenant": command.tenant,
        "key_id": command.key_id,
    }
    if isinstance(command, StartTurn):
        context["turn_id"] = command.turn_id
    return context


def _span_name(command: Mailed) -> str:
    # The GenAI conventions' agent span: the session runs the model's pipeline as an agent.
    if isinstance(command, StartTurn):
        return f"invoke_agent {command.model}"
    return "delete_session" if isinstance(command, DeleteSession) else "edit_conversation"


def _span_attributes(command: Mailed) -> dict[str, str | bool]:
    attributes: dict[str, str | bool] = {
        "gen_ai.conversation.id": command.session_id,
        "gen_ai.provider.name": "veil",
        "veil.tenant": command.tenant,
    }
    if isinstance(command, StartTurn):
        attributes.update(
            {
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": command.model,
                "gen_ai.request.model": command.model,
                "gen_ai.request.stream": command.stream,
                "veil.turn.id": command.turn_id,
            }
        )
    return attributes


def _turn_ended(start: StartTurn, step: turn.Step) -> None:
    """The turn's outcome on its span and in one log line (its text only at debug level)."""
    reply, pipeline = step.reply, step.progress.pipeline
    span = telemetry.current_span()
    if span is not None:
        span.set_attribute("veil.pipeline", pipeline)
        if isinstance(reply, TurnDone):
            span.set_attributes(
                {
                    "gen_ai.response.finish_reasons": [reply.finish_reason],
                    "gen_ai.usage.input_tokens": reply.usage.prompt_tokens,
                    "gen_ai.usage.output_tokens": reply.usage.completion_tokens,
                }
            )
        elif isinstance(reply, TurnError) and reply.error.status >= 500:
            telemetry.failed(span, reply.error.code)
    fields: dict[str, object] = {"model": start.model, "pipeline": pipeline or None}
    if isinstance(reply, TurnDone):
        fields.update(
            outcome="done",
            finish_reason=reply.finish_reason,
            prompt_tokens=reply.usage.prompt_tokens,
            completion_tokens=reply.usage.completion_tokens,
        )
    elif isinstance(reply, TurnError):
        fields.update(outcome="failed", status=reply.error.status, code=reply.error.code)
    else:
        fields["outcome"] = "cancelled"
    if log.is_enabled_for(logging.DEBUG):
        # Conversations stay out of the logs unless an operator asks for them.
        fields["messages"] = [m.content for m in start.messages]
        fields["reply"] = reply.content if reply is not None else None
        log.debug("turn.ended", **fields)
    else:
        log.info("turn.ended", **fields)


def _started_elsewhere(events: list[EventUnion], turn_id: str, holder: str) -> str | None:
    """The other holder that the turn's start among `events` (as the log holds them) names."""
    for e in events:
        if isinstance(e, TurnStarted) and e.turn_id == turn_id and e.holder not in (None, holder):
            return e.holder
    return None
