"""The session actor's shell: load, decide, append, then act and reply.

All I/O of a session lives here; the logic is in actors/session.py. One
instance per active session id in a worker; the runtime feeds it one request
at a time, so turns of one session run one after the other. Across workers,
the append's expected sequence and the turn lease keep a single writer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, assert_never

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.micro.request import Request

from actors import session
from actors.engines import unsupported_parameter
from actors.errors import ActorError, AlreadyHandled, RequestAbandoned, TurnInProgress
from actors.model_chain import run_chain
from bus.codec import DecodeError
from bus.requests import BUS_DOWN, nats_request
from bus.runtime import Envelope
from bus.subjects import (
    ROUTER_ROUTE,
    session_cancel,
    session_events,
    session_out,
)
from config import ModelConfig
from contracts.errors import ErrorInfo, error_info
from contracts.model import GenerateRequest, GenerateResult
from contracts.router import ROUTE_CODEC, ROUTE_REPLY_CODEC, RouteDecision, RouteRequest
from contracts.session import (
    OUTPUT_CODEC,
    TURN_REPLY_CODEC,
    DeleteSession,
    StartTurn,
    TurnAccepted,
    TurnDone,
    TurnError,
    TurnRejected,
)
from eventstore.errors import ConcurrencyConflict, StoreUnavailable
from eventstore.events import (
    ChatMessage,
    EventUnion,
    PipelineChosen,
    ToolLoopStopped,
    ToolsCalled,
    TurnFailed,
)

__all__ = ["SessionActor", "SessionContext"]

from actors._session_common import SessionContext, _outcome_message, fold_stored
from actors._session_queries import SessionQueries
from actors._turn_steps import TurnSteps

log = structlog.get_logger("veil.session")

# Appends that keep conflicting mean a writer is fighting us; give up after this many.
MAX_CONFLICTS = 20
# While another worker's turn holds the session, ask it this often whether it still runs.
PROBE_EVERY = 2.0
GONE_BEFORE_START = "The client went away before the turn could start."


class SessionActor(SessionQueries, TurnSteps):
    def __init__(self, session_id: str, ctx: SessionContext) -> None:
        self.session_id = session_id
        self._ctx = ctx
        self._state = session.initial()
        self._last_seq = 0
        self._loaded = False
        # True while the state is assumed empty rather than read (a session just minted).
        self._assumed_new = False
        # The session was deleted: its id stays unused.
        self._erased = False

    async def stop(self) -> None:
        return None

    async def _reload(self) -> None:
        """Catch up with the log: everything after what this actor has seen."""
        # A deletion that was cut short after its tombstone: finish it first.
        if (
            not self._loaded
            and self._ctx.tombstones is not None
            and await self._ctx.tombstones.get(self.session_id) is not None
        ):
            await self._ctx.store.erase(self.session_id)
            self._loaded = self._erased = True
            return
        stored = await self._ctx.store.load(self.session_id, after=self._last_seq)
        if stored:
            self._state = await fold_stored(self._state, stored)
            self._last_seq = stored[-1].seq
        self._loaded = True

    def owned_by(self, tenant: str) -> bool:
        """Whether this actor's state (once read) shows `tenant`'s session."""
        state = self._state
        return self._loaded and state.session_id is not None and state.tenant == tenant

    def snapshot(self) -> tuple[session.SessionState, int]:
        """The state as of a log position, for reads that must not wait for the mailbox."""
        return self._state, self._last_seq

    async def _append(
        self, command: session.Command, dedupe_id: str | None = None
    ) -> list[EventUnion]:
        """Decide and append, reloading and deciding again on a conflict."""
        for _ in range(MAX_CONFLICTS):
            events = session.decide(self._state, command)
            if not events:
                return events
            try:
                self._last_seq = await self._ctx.store.append(
                    self.session_id,
                    events,
                    expected_last_seq=self._last_seq,
                    # Unread state must not take stored duplicates for its own append: it
                    # conflicts instead, reloads, and then sees the command as handled.
                    dedupe_id=None if self._assumed_new else dedupe_id,
                )
            except ConcurrencyConflict:
                self._assumed_new = False
                await self._reload()
                continue
            self._assumed_new = False
            for event in events:
                self._state = session.evolve(self._state, event)
            return events
        raise ConcurrencyConflict(self.session_id, self._last_seq)

    async def receive(self, envelope: Envelope) -> None:
        """A command the front admitted (actors/session_front.py): a turn or a deletion."""
        request, command = envelope.request, envelope.message
        if not isinstance(command, StartTurn | DeleteSession):
            await self._reject(request, error_info(400, "bad_command", "not a mailbox command"))
            return
        try:
            await self._handle(request, command)
        except (StoreUnavailable, *BUS_DOWN) as error:
            # The log or the model is out of reach (the bus is down): "try again", not an
            # actor failure (whose traceback, logged by the thousand, would stall the loop).
            # What this actor holds may be behind the log now: read it again next time.
            log.warning("session.bus_unavailable", session=self.session_id, error=repr(error))
            self._state, self._last_seq, self._loaded = session.initial(), 0, False
            message = "The session log is unavailable; try again shortly."
            with contextlib.suppress(Exception):
                await self._reject(request, error_info(503, "service_unavailable", message))

    async def _handle(self, request: Request, command: StartTurn | DeleteSession) -> None:
        if not self._loaded:
            if isinstance(command, StartTurn) and command.new_session and command.random_id:
                # An id the gateway just drew has no log and no tombstone: start from the
                # empty state. The first append expects an empty log, so a session that is
                # not new after all conflicts and reloads.
                self._loaded = self._assumed_new = True
            else:
                await self._reload()
        if isinstance(command, StartTurn) and command.new_session and self._erased:
            # A first turn retried under its Idempotency-Key after its session was deleted:
            # a deleted id never opens again.
            message = "The session this request opened has been deleted; send it again with a new Idempotency-Key."
            await self._reject(request, error_info(409, "session_deleted", message))
            return
        match command:
            case StartTurn():
                await self._start_turn(request, command)
            case DeleteSession():
                await self._delete(request, command)
            case _:
                assert_never(command)

    async def _start_turn(self, request: Request, start: StartTurn) -> None:
        model = self._ctx.config.model(start.model)
        if model is None:
            await self._reject(
                request,
                error_info(404, "model_not_found", f"The model '{start.model}' does not exist."),
            )
            return
        bad_param = self._check_params(model, start)
        if bad_param is not None:
            await self._reject(request, bad_param)
            return
        if self._ctx.signals.fired(session_cancel(self.session_id, start.abandon_id)):
            # Its client gave up while it waited for the session: it never starts.
            await self._reject(request, error_info(499, "client_gone", GONE_BEFORE_START))
            return
        with self._ctx.leases.holding(start.turn_id):
            await self._hold_turn(request, start, model)

    async def _hold_turn(self, request: Request, start: StartTurn, model: ModelConfig) -> None:
        """Open and run the turn while this worker answers that it holds its lease."""
        out = session_out(self.session_id, start.turn_id)
        finish = self._finisher(request, start, out)
        # With one pipeline the choice needs no router: TurnStarted records it.
        only = model.candidates[0] if len(model.candidates) == 1 else None
        try:
            await self._open(start, only)
        except AlreadyHandled as handled:
            if start.stream:
                await request.respond(
                    TURN_REPLY_CODEC.encode(TurnAccepted(turn_id=handled.turn_id, replay=True))
                )
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
            await request.respond(TURN_REPLY_CODEC.encode(TurnAccepted(turn_id=start.turn_id)))
        await self._run_turn(start, model, finish)

    def _finisher(
        self, request: Request, start: StartTurn, out: str
    ) -> Callable[[TurnDone | TurnError], Awaitable[None]]:
        """Where a turn's result goes: the stream's output subject, or the request's reply."""

        async def publish(message: TurnDone | TurnError) -> None:
            await self._ctx.nc.publish(out, OUTPUT_CODEC.encode(message))

        async def reply(message: TurnDone | TurnError) -> None:
            await request.respond(TURN_REPLY_CODEC.encode(message))

        return publish if start.stream else reply

    def _check_params(self, model: ModelConfig, start: StartTurn) -> ErrorInfo | None:
        """Refuse parameters an engine that may answer cannot honour, before the log is touched."""
        config = self._ctx.config
        links = [link for name in model.candidates for link in config.pipelines[name].chain]
        for link in links:
            name = unsupported_parameter(config.engines[link.engine].kind, start.params)
            if name is not None:
                return ErrorInfo(
                    status=400,
                    type="invalid_request_error",
                    code="unsupported_parameter",
                    message=f"The parameter '{name}' is not supported by the model '{start.model}'.",
                    param=name,
                )
        return None

    async def _open(self, start: StartTurn, pipeline: str | None) -> None:
        """Append TurnStarted, waiting while another writer's turn holds the lease.

        While it waits it asks the lease's holder every PROBE_EVERY seconds whether it
        still runs that turn: a dead holder frees the session at once. A request whose
        client gives up meanwhile stops waiting and never starts.
        """
        cancel = session_cancel(self.session_id, start.abandon_id)
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
                events = await self._append(command, dedupe_id=start.command_id)
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
            except (AlreadyHandled, ActorError) as refusal:
                # Another worker may have moved the session on since this actor
                # last read it: refuse only on a state that is up to date.
                if isinstance(refusal, AlreadyHandled) or fresh:
                    raise
                await self._reload()
            else:
                lost = [e for e in events if isinstance(e, TurnFailed) and e.code == "worker_lost"]
                for failed in lost:
                    await self._tell_lost(failed)
                return
            fresh = True

    async def _tell_lost(self, failed: TurnFailed) -> None:
        """A gateway still streaming the lost turn hears that it ended, instead of timing out."""
        error = error_info(failed.status, failed.code, failed.message)
        with contextlib.suppress(Exception):
            await self._ctx.nc.publish(
                session_out(self.session_id, failed.turn_id),
                OUTPUT_CODEC.encode(TurnError(error=error)),
            )

    async def _wait_for_change(self, until: datetime, cancel: str) -> None:
        """Sleep until the session's log grows, `until` comes, or the request is cancelled."""
        changed = asyncio.Event()

        async def on_event(_: Msg) -> None:
            changed.set()

        unwatch = await self._ctx.signals.watch(cancel, changed.set)
        sub = await self._ctx.nc.subscribe(session_events(self.session_id), cb=on_event)
        try:
            # Check once after subscribing: the turn may have ended in between.
            if await self._ctx.store.last_seq(self.session_id) != self._last_seq:
                return
            timeout = max(0.0, (until - self._ctx.clock()).total_seconds()) + 0.05
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await changed.wait()
        finally:
            unwatch()
            await sub.unsubscribe()

    def _chosen(self, start: StartTurn, decision: RouteDecision) -> PipelineChosen:
        return PipelineChosen(
            at=self._ctx.clock(),
            turn_id=start.turn_id,
            pipeline=decision.pipeline,
            means=decision.means,
            detail=decision.detail,
            scores=decision.scores,
            runner_up=decision.runner_up,
            runner_up_score=decision.runner_up_score,
        )

    async def _choose_pipeline(self, start: StartTurn, model: ModelConfig) -> str:
        """Ask the router (for a model with several pipelines) and record its decision."""
        candidates = model.candidates
        if len(candidates) == 1:
            return candidates[0]  # recorded with TurnStarted
        state = self._state
        text = next((m.content for m in reversed(start.messages) if m.role == "user"), "")
        pinned = state.pipeline if model.pin and state.last_model == start.model else None
        ask = RouteRequest(model=start.model, text=text, metadata=start.metadata, pinned=pinned)
        try:
            reply = await nats_request(
                self._ctx.nc, ROUTER_ROUTE, ROUTE_CODEC.encode(ask), timeout=10
            )
            decision = ROUTE_REPLY_CODEC.decode(reply.data)
        except (NoRespondersError, NatsTimeout, DecodeError) as failure:
            log.warning("session.router_unavailable", session=self.session_id, error=repr(failure))
            decision = RouteDecision(
                pipeline=pinned or candidates[0],
                means="pinned" if pinned else "default",
                detail=f"router unavailable: {failure!r}",
            )
        await self._append(session.RecordRoute(chosen=self._chosen(start, decision)))
        return decision.pipeline

    async def _run_turn(
        self,
        start: StartTurn,
        model: ModelConfig,
        finish: Callable[[TurnDone | TurnError], Awaitable[None]],
    ) -> None:
        out = session_out(self.session_id, start.turn_id)
        nc = self._ctx.nc
        pipeline = self._ctx.config.pipelines[await self._choose_pipeline(start, model)]
        cancel_subject = session_cancel(self.session_id, start.turn_id)
        cancelled = asyncio.Event()
        unwatch = await self._ctx.signals.watch(cancel_subject, cancelled.set)
        result: GenerateResult | None = None
        error: ErrorInfo | None = None
        try:
            if pipeline.summarize:
                await self._fold_history(start.turn_id, pipeline)
            memories = await self._recall(start, pipeline)
            documents = await self._retrieve(start, pipeline)
            memories = "\n\n".join(part for part in (memories, documents) if part) or None
            server_tools = [self._ctx.tools[name] for name in pipeline.tools]
            hidden = [t.name for t in server_tools]
            params = pipeline.params.under(start.params)
            if server_tools:
                params["tools"] = [*params.get("tools", []), *(t.schema() for t in server_tools)]

            async def record(failed: GenerateResult) -> None:
                now = self._ctx.clock()
                await self._append(
                    session.RecordModelCall(
                        turn_id=start.turn_id, result=failed, purpose="reply", now=now
                    )
                )

            steps = 0
            while True:
                messages = session.prompt(
                    self._state, pipeline.system_prompt, pipeline.budget, memories
                )

                def make_job(
                    upstream_model: str,
                    messages: list[ChatMessage] = messages,
                    params: dict[str, Any] = params,
                    hidden: list[str] = hidden,
                ) -> GenerateRequest:
                    return GenerateRequest(
                        turn_id=start.turn_id,
                        upstream_model=upstream_model,
                        messages=messages,
                        params=params,
                        out_subject=out if start.stream else None,
                        cancel_subject=cancel_subject,
                        hidden_tools=hidden,
                    )

                # The engine's own timeout fires first, so a slow upstream reads as 504 from it.
                result = await run_chain(
                    nc,
                    pipeline,
                    make_job,
                    timeout=self._ctx.config.server.turn_timeout,
                    record=record,
                    cancelled=cancelled,
                )
                error = result.error
                server_calls = [c for c in result.tool_calls if c.function.name in hidden]
                if error is not None or cancelled.is_set() or result.cancelled or not server_calls:
                    break
                if steps >= pipeline.max_tool_steps:
                    # Out of steps: record it, and ask once more for an answer without tools.
                    stopped = ToolLoopStopped(
                        at=self._ctx.clock(), turn_id=start.turn_id, steps=steps
                    )
                    await self._append(session.RecordToolStop(stopped=stopped))
                    await record(result)
                    params = {**params, "tool_choice": "none"}
                    hidden = []
                    continue
                results = await self._run_tools(server_calls, pipeline.tool_timeout)
                step = ToolsCalled(
                    at=self._ctx.clock(),
                    turn_id=start.turn_id,
                    assistant=ChatMessage(
                        role="assistant",
                        content=result.content,
                        tool_calls=tuple(result.tool_calls),
                    ),
                    results=results,
                )
                await self._append(session.RecordToolStep(step=step, result=result))
                steps += 1
                client_calls = [c for c in result.tool_calls if c.function.name not in hidden]
                if client_calls:
                    # The client answers its own calls; the server's are already in the steps.
                    result = msgspec.structs.replace(
                        result, content="", tool_calls=client_calls, finish_reason="tool_calls"
                    )
                    break
        finally:
            unwatch()
        now = self._ctx.clock()
        if cancelled.is_set() or (result is not None and result.cancelled):
            await self._append(session.CancelTurn(turn_id=start.turn_id, now=now, result=result))
            if not start.stream:  # a request always gets its answer, even if nobody reads it
                await finish(
                    TurnError(error=error_info(499, "turn_cancelled", "The client went away."))
                )
            return
        if error is not None:
            await self._append(
                session.FailTurn(turn_id=start.turn_id, error=error, now=now, result=result)
            )
            streamed = result.deltas if result else 0
            await finish(
                TurnError(error=error, content=result.content if result else "", deltas=streamed)
            )
            return
        assert result is not None
        turn_messages = self._state.open_turn.messages if self._state.open_turn else ()
        await self._append(session.CompleteTurn(turn_id=start.turn_id, result=result, now=now))
        await finish(
            TurnDone(
                content=result.content,
                finish_reason=result.finish_reason,
                usage=result.usage,
                deltas=result.deltas,
                tool_calls=result.tool_calls,
                alternatives=result.alternatives,
            )
        )
        if pipeline.memory.extract_facts:
            # After the reply went out: the client does not wait for this.
            exchange = [*turn_messages, ChatMessage(role="assistant", content=result.content)]
            await self._extract_facts(start.turn_id, pipeline, exchange)

    async def _reject(self, request: Request, error: ErrorInfo) -> None:
        await request.respond(TURN_REPLY_CODEC.encode(TurnRejected(error=error)))
