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
from datetime import UTC, datetime, timedelta
from typing import assert_never

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

from nats.errors import TimeoutError as NatsTimeout
from nats.micro.request import Request

from actors import session
from actors.engines import unsupported_parameter
from actors.errors import ActorError, AlreadyHandled, SessionNotFound, TurnInProgress
from actors.model_chain import call_model, run_chain
from actors.protocol import (
    GENERATE_CODEC,
    GENERATE_RESULT_CODEC,
    OUTPUT_CODEC,
    SESSION_COMMAND_CODEC,
    TURN_REPLY_CODEC,
    DeleteSession,
    ErrorInfo,
    GenerateRequest,
    GenerateResult,
    GetSession,
    MemoriesFound,
    MemoryFound,
    SearchMemories,
    SessionDeleted,
    SessionView,
    StartTurn,
    TurnAccepted,
    TurnDone,
    TurnError,
    TurnRejected,
)
from actors.knowledge.actor import KNOWLEDGE_SEARCH, SEARCH_CODEC, SEARCH_REPLY_CODEC, KnowledgeSearch
from actors.knowledge.events import chunk_id
from actors.knowledge.prompting import documents_block
from actors.memory.actor import RECALL_CODEC, RECALL_REPLY_CODEC, RecallRequest
from actors.memory.prompting import choose_memories, memory_block
from actors.summary import facts_prompt, parse_facts, summary_prompt
from actors.tools.actor import RUN_CODEC, RUN_REPLY_CODEC, RunTool, ToolRan
from actors.tools.builtin import Tool
from bus.codec import DecodeError, encode
from bus.subjects import MEMORY_FORGET, MEMORY_RECALL, ROUTER_ROUTE, TOOLS_RUN, model_generate, session_cancel, session_events, session_out
from eventstore.errors import ConcurrencyConflict
from eventstore.events import (
    ChatMessage,
    DocumentsRetrieved,
    RetrievedChunk,
    EventUnion,
    MemoryRecalled,
    PipelineChosen,
    RecalledMemory,
    ToolCall,
    ToolLoopStopped,
    ToolResult,
    ToolsCalled,
)
from eventstore.store import EventStore
from eventstore.tombstones import Tombstone, TombstoneLog
from actors.router_actor import ROUTE_CODEC, ROUTE_REPLY_CODEC, RouteRequest
from actors.routing import RouteDecision
from veil.config import Config, ModelConfig, PipelineConfig

__all__ = ["SessionActor", "SessionContext"]

log = structlog.get_logger("veil.session")

# Appends that keep conflicting mean a writer is fighting us; give up after this many.
MAX_CONFLICTS = 20


class SessionContext(msgspec.Struct, kw_only=True):
    """What every session actor of a worker shares."""

    nc: Client
    store: EventStore
    config: Config
    tombstones: TombstoneLog | None = None
    # Every tool a pipeline may name (their schemas go to the model; the tool actor runs them).
    tools: dict[str, Tool] = {}
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)


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


class SessionActor:
    def __init__(self, session_id: str, ctx: SessionContext) -> None:
        self.session_id = session_id
        self._ctx = ctx
        self._state = session.initial()
        self._last_seq = 0
        self._loaded = False

    async def stop(self) -> None:
        return None

    async def _reload(self) -> None:
        """Catch up with the log: everything after what this actor has seen."""
        if not self._loaded and self._ctx.tombstones is not None:
            # A deletion that was cut short after its tombstone: finish it first.
            if await self._ctx.tombstones.get(self.session_id) is not None:
                await self._ctx.store.erase(self.session_id)
                self._loaded = True
                return
        stored = await self._ctx.store.load(self.session_id, after=self._last_seq)
        for item in stored:
            self._state = session.evolve(self._state, item.event)
            self._last_seq = item.seq
        self._loaded = True

    async def _append(self, command: session.Command, dedupe_id: str | None = None) -> list[EventUnion]:
        """Decide and append, reloading and deciding again on a conflict."""
        for _ in range(MAX_CONFLICTS):
            events = session.decide(self._state, command)
            if not events:
                return events
            try:
                self._last_seq = await self._ctx.store.append(
                    self.session_id, events, expected_last_seq=self._last_seq, dedupe_id=dedupe_id
                )
            except ConcurrencyConflict:
                await self._reload()
                continue
            for event in events:
                self._state = session.evolve(self._state, event)
            return events
        raise ConcurrencyConflict(self.session_id, self._last_seq)

    async def receive(self, request: Request) -> None:
        try:
            command = SESSION_COMMAND_CODEC.decode(request.data)
        except DecodeError as error:
            await self._reject(request, _error(400, "bad_command", f"bad command: {error}"))
            return
        if command.session_id != self.session_id:
            await self._reject(request, _error(400, "bad_command", "session id does not match subject"))
            return
        if not self._loaded:
            await self._reload()
        match command:
            case StartTurn():
                await self._start_turn(request, command)
            case GetSession():
                await self._get(request, command)
            case DeleteSession():
                await self._delete(request, command)
            case SearchMemories():
                await self._search(request, command)
            case _:
                assert_never(command)

    def _owned_by(self, tenant: str) -> bool:
        return self._state.session_id is not None and self._state.tenant == tenant

    async def _get(self, request: Request, command: GetSession) -> None:
        await self._reload()  # another worker may have moved it on
        state = self._state
        if not self._owned_by(command.tenant):
            await self._reject(request, _not_found(self.session_id))
            return
        assert state.created_at is not None and state.updated_at is not None
        view = SessionView(
            session_id=self.session_id,
            created_at=state.created_at,
            updated_at=state.updated_at,
            turns=state.turns,
            usage=state.usage,
            model=state.open_turn.model if state.open_turn else state.last_model,
            messages=list(state.history) if command.messages else None,
        )
        await request.respond(TURN_REPLY_CODEC.encode(view))

    async def _search(self, request: Request, command: SearchMemories) -> None:
        await self._reload()
        if not self._owned_by(command.tenant):
            await self._reject(request, _not_found(self.session_id))
            return
        ask = RecallRequest(
            tenant=command.tenant,
            session_id=self.session_id,
            user_id=self._state.user_id,
            query=command.query,
            k=command.k,
        )
        try:
            reply = await self._ctx.nc.request(MEMORY_RECALL, RECALL_CODEC.encode(ask), timeout=10)
        except NoRespondersError:
            await self._reject(request, _error(503, "memory_unavailable", "Long-term memory is not running."))
            return
        except NatsTimeout:
            await self._reject(request, _error(504, "timeout", "Long-term memory did not answer in time."))
            return
        hits = [
            MemoryFound(
                id=h.id,
                session_id=h.session_id,
                role=h.role,
                kind=h.kind,
                text=h.text,
                score=h.score,
                created_at=h.created_at,
                vector_similarity=h.vector_similarity,
                bm25=h.bm25,
            )
            for h in RECALL_REPLY_CODEC.decode(reply.data).hits
        ]
        await request.respond(TURN_REPLY_CODEC.encode(MemoriesFound(hits=hits)))

    async def _delete(self, request: Request, command: DeleteSession) -> None:
        await self._reload()
        if not self._owned_by(command.tenant):
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
        erased = await self._ctx.store.erase(self.session_id)
        memories = await self._forget_memories(command.tenant)
        self._state = session.initial()
        self._last_seq = 0
        log.info("session.deleted", session=self.session_id, events=erased, memories=memories)
        reply = SessionDeleted(session_id=self.session_id, events_erased=erased, memories_erased=memories)
        await request.respond(TURN_REPLY_CODEC.encode(reply))

    async def _forget_memories(self, tenant: str) -> int:
        """Ask the memory actor to drop the session's rows now; its tombstone check covers outages."""
        body = encode({"tenant": tenant, "session_id": self.session_id})
        try:
            reply = await self._ctx.nc.request(MEMORY_FORGET, body, timeout=10)
        except (NoRespondersError, NatsTimeout):
            return 0
        count = msgspec.json.decode(reply.data).get("deleted", 0)
        return int(count)

    async def _start_turn(self, request: Request, start: StartTurn) -> None:
        model = self._ctx.config.model(start.model)
        if model is None:
            await self._reject(
                request,
                _error(404, "model_not_found", f"The model '{start.model}' does not exist."),
            )
            return
        bad_param = self._check_params(model, start)
        if bad_param is not None:
            await self._reject(request, bad_param)
            return
        out = session_out(self.session_id, start.turn_id)
        finish = self._finisher(request, start, out)
        # With one pipeline the choice needs no router: TurnStarted records it.
        only = model.candidates[0] if len(model.candidates) == 1 else None
        try:
            await self._open(start, only)
        except AlreadyHandled as handled:
            if start.stream:
                await request.respond(TURN_REPLY_CODEC.encode(TurnAccepted(turn_id=handled.turn_id, replay=True)))
            if handled.outcome is not None:
                await finish(_outcome_message(handled.outcome))
            elif not start.stream:
                await self._reject(request, _error(409, "in_progress", "The same request is still running."))
            return
        except ActorError as refusal:
            await self._reject(request, _error(refusal.status, refusal.code, str(refusal)))
            return
        if start.stream:
            await request.respond(TURN_REPLY_CODEC.encode(TurnAccepted(turn_id=start.turn_id)))
        await self._run_turn(start, model, finish)

    def _finisher(self, request: Request, start: StartTurn, out: str) -> Callable[[TurnDone | TurnError], Awaitable[None]]:
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
        """Append TurnStarted, waiting out another writer's turn if it holds the lease."""
        fresh = False
        while True:
            now = self._ctx.clock()
            lease = now + timedelta(seconds=self._ctx.config.server.turn_timeout)
            try:
                await self._append(
                    session.OpenTurn(start=start, now=now, lease_until=lease, pipeline=pipeline),
                    dedupe_id=start.command_id,
                )
                return
            except TurnInProgress as busy:
                log.info("session.waiting", session=self.session_id, busy_turn=busy.turn_id)
                await self._wait_for_change(busy.lease_until)
                await self._reload()
            except (AlreadyHandled, ActorError) as refusal:
                # Another worker may have moved the session on since this actor
                # last read it: refuse only on a state that is up to date.
                if isinstance(refusal, AlreadyHandled) or fresh:
                    raise
                await self._reload()
            fresh = True

    async def _wait_for_change(self, until: datetime) -> None:
        """Sleep until the session's log grows or the other writer's lease runs out."""
        changed = asyncio.Event()

        async def on_event(_: Msg) -> None:
            changed.set()

        sub = await self._ctx.nc.subscribe(session_events(self.session_id), cb=on_event)
        try:
            # Check once after subscribing: the turn may have ended in between.
            if await self._ctx.store.last_seq(self.session_id) != self._last_seq:
                return
            timeout = max(0.0, (until - self._ctx.clock()).total_seconds()) + 0.05
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout)
        finally:
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
            reply = await self._ctx.nc.request(ROUTER_ROUTE, ROUTE_CODEC.encode(ask), timeout=10)
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
        self, start: StartTurn, model: ModelConfig, finish: Callable[[TurnDone | TurnError], Awaitable[None]]
    ) -> None:
        out = session_out(self.session_id, start.turn_id)
        nc = self._ctx.nc
        pipeline = self._ctx.config.pipelines[await self._choose_pipeline(start, model)]
        cancel_subject = session_cancel(self.session_id, start.turn_id)
        cancelled = asyncio.Event()

        async def on_cancel(_: Msg) -> None:
            cancelled.set()

        cancel_sub = await nc.subscribe(cancel_subject, cb=on_cancel)
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
                    session.RecordModelCall(turn_id=start.turn_id, result=failed, purpose="reply", now=now)
                )

            steps = 0
            while True:
                messages = session.prompt(self._state, pipeline.system_prompt, pipeline.budget, memories)

                def make_job(upstream_model: str) -> GenerateRequest:
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
                    stopped = ToolLoopStopped(at=self._ctx.clock(), turn_id=start.turn_id, steps=steps)
                    await self._append(session.RecordToolStop(stopped=stopped))
                    await record(result)
                    params = {**params, "tool_choice": "none"}
                    hidden = []
                    continue
                results = await self._run_tools(server_calls, pipeline.tool_timeout)
                step = ToolsCalled(
                    at=self._ctx.clock(),
                    turn_id=start.turn_id,
                    assistant=ChatMessage(role="assistant", content=result.content, tool_calls=tuple(result.tool_calls)),
                    results=results,
                )
                await self._append(session.RecordToolStep(step=step, result=result))
                steps += 1
                client_calls = [c for c in result.tool_calls if c.function.name not in hidden]
                if client_calls:
                    # The client answers its own calls; the server's are already in the steps.
                    result = msgspec.structs.replace(result, content="", tool_calls=client_calls, finish_reason="tool_calls")
                    break
        finally:
            with contextlib.suppress(Exception):
                await cancel_sub.unsubscribe()
        now = self._ctx.clock()
        if cancelled.is_set() or (result is not None and result.cancelled):
            await self._append(session.CancelTurn(turn_id=start.turn_id, now=now, result=result))
            if not start.stream:  # a request always gets its answer, even if nobody reads it
                await finish(TurnError(error=_error(499, "turn_cancelled", "The client went away.")))
            return
        if error is not None:
            await self._append(
                session.FailTurn(turn_id=start.turn_id, error=error, now=now, result=result)
            )
            streamed = result.deltas if result else 0
            await finish(TurnError(error=error, content=result.content if result else "", deltas=streamed))
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

    async def _extract_facts(self, turn_id: str, pipeline: PipelineConfig, exchange: list[ChatMessage]) -> None:
        link = pipeline.chain[0]
        job = GenerateRequest(
            turn_id=turn_id, upstream_model=link.model, messages=facts_prompt(exchange),
            params={"temperature": 0.0, "max_tokens": 256},
        )
        result = await call_model(self._ctx.nc, link, job, timeout=self._ctx.config.server.turn_timeout)
        facts = [] if result.error else parse_facts(result.content)
        await self._append(session.RecordFacts(turn_id=turn_id, facts=facts, result=result, now=self._ctx.clock()))

    async def _run_tools(self, calls: list[ToolCall], timeout: float) -> list[ToolResult]:
        """Run server tool calls concurrently through the tool actor; failures become results."""

        async def one(call: ToolCall) -> ToolResult:
            state = self._state
            pipeline = self._ctx.config.pipelines.get(state.pipeline or "")
            context = {
                "tenant": state.tenant,
                "session_id": self.session_id,
                "user_id": state.user_id,
                "collections": ",".join(pipeline.knowledge) if pipeline else "",
            }
            ask = RunTool(name=call.function.name, arguments=call.function.arguments, timeout=timeout, context=context)
            try:
                reply = await self._ctx.nc.request(TOOLS_RUN, RUN_CODEC.encode(ask), timeout=timeout + 5)
                ran = RUN_REPLY_CODEC.decode(reply.data)
            except NoRespondersError:
                ran = ToolRan(error="no tool worker is running")
            except NatsTimeout:
                ran = ToolRan(error=f"the tool did not answer within {timeout:g} s")
            return ToolResult(
                call_id=call.id,
                name=call.function.name,
                arguments=call.function.arguments,
                content=ran.content,
                error=ran.error,
                duration_ms=ran.duration_ms,
            )

        return list(await asyncio.gather(*(one(c) for c in calls)))

    async def _retrieve(self, start: StartTurn, pipeline: PipelineConfig) -> str | None:
        """Search the pipeline's knowledge collections for this turn; record what goes in."""
        state = self._state
        if not pipeline.knowledge or state.open_turn is None:
            return None
        query = next((m.content for m in reversed(state.open_turn.messages) if m.role == "user"), "")
        if not query.strip():
            return None
        ask = KnowledgeSearch(
            collections=pipeline.knowledge, query=query, k=pipeline.knowledge_k, threshold=pipeline.knowledge_threshold
        )
        now = self._ctx.clock()
        try:
            reply = await self._ctx.nc.request(KNOWLEDGE_SEARCH, SEARCH_CODEC.encode(ask), timeout=10)
            hits = SEARCH_REPLY_CODEC.decode(reply.data).hits
        except (NoRespondersError, NatsTimeout, DecodeError) as failure:
            retrieved = DocumentsRetrieved(
                at=now, turn_id=start.turn_id, collections=pipeline.knowledge, query=query, error=repr(failure)
            )
            await self._append(session.RecordDocuments(retrieved=retrieved))
            return None
        retrieved = DocumentsRetrieved(
            at=now,
            turn_id=start.turn_id,
            collections=pipeline.knowledge,
            query=query,
            chunks=[
                RetrievedChunk(
                    id=chunk_id(h.collection, h.sha256, h.chunk),
                    collection=h.collection,
                    path=h.path,
                    sha256=h.sha256,
                    chunk=h.chunk,
                    offset=h.position.offset,
                    page=h.position.page,
                    score=round(h.score, 6),
                    similarity=round(h.similarity, 6),
                )
                for h in hits
            ],
        )
        await self._append(session.RecordDocuments(retrieved=retrieved))
        return documents_block(hits, cite=pipeline.cite_sources) if hits else None

    async def _recall(self, start: StartTurn, pipeline: PipelineConfig) -> str | None:
        """Ask long-term memory about this turn; record what came back and what is used."""
        policy = pipeline.memory
        state = self._state
        if not self._ctx.config.memory.enabled or not policy.recall or state.open_turn is None or state.tenant is None:
            return None
        query = next((m.content for m in reversed(state.open_turn.messages) if m.role == "user"), "")
        if not query.strip():
            return None
        ask = RecallRequest(
            tenant=state.tenant, session_id=self.session_id, user_id=state.user_id, query=query, k=policy.k
        )
        now = self._ctx.clock()
        try:
            reply = await self._ctx.nc.request(MEMORY_RECALL, RECALL_CODEC.encode(ask), timeout=policy.timeout)
            hits = RECALL_REPLY_CODEC.decode(reply.data).hits
        except NoRespondersError:
            return None  # no memory actor runs: memory is off
        except (NatsTimeout, DecodeError) as failure:
            recalled = MemoryRecalled(at=now, turn_id=start.turn_id, query=query, user_id=state.user_id, error=repr(failure))
            await self._append(session.RecordRecall(recalled=recalled))
            return None
        in_prompt = {m.content for m in session.prompt(state, None, pipeline.budget)}
        used = choose_memories(hits, in_prompt, policy)
        recalled = MemoryRecalled(
            at=now,
            turn_id=start.turn_id,
            query=query,
            user_id=state.user_id,
            hits=[
                RecalledMemory(
                    id=h.id,
                    session_id=h.session_id,
                    source_seq=h.source_seq,
                    kind=h.kind,
                    role=h.role,
                    score=round(h.score, 6),
                    vector_similarity=None if h.vector_similarity is None else round(h.vector_similarity, 6),
                    bm25=None if h.bm25 is None else round(h.bm25, 6),
                    used=h in used,
                    text=h.text if h.session_id == self.session_id else None,
                )
                for h in hits
            ],
        )
        await self._append(session.RecordRecall(recalled=recalled))
        return memory_block(used, self.session_id) if used else None

    async def _fold_history(self, turn_id: str, pipeline: PipelineConfig) -> None:
        """Fold old turns into the running summary when history outgrows the budget.

        A failed summary is recorded and changes nothing: the turns stay in the
        history, and this prompt leaves out the oldest of them instead.
        """
        covers = session.fold_plan(self._state, pipeline.budget)
        if covers is None:
            return
        state = self._state
        job = GenerateRequest(
            turn_id=turn_id,
            upstream_model=pipeline.model,
            messages=summary_prompt(state.summary, state.history[state.summarized:covers]),
            params={"temperature": 0.0},
        )
        now = self._ctx.clock
        try:
            reply = await self._ctx.nc.request(
                model_generate(pipeline.engine), GENERATE_CODEC.encode(job),
                timeout=self._ctx.config.server.turn_timeout,
            )
            result = GENERATE_RESULT_CODEC.decode(reply.data)
        except (NoRespondersError, NatsTimeout, DecodeError) as failure:
            log.warning("session.summary_failed", session=self.session_id, error=repr(failure))
            return
        if result.error is not None or not result.content.strip():
            await self._append(session.RecordModelCall(turn_id=turn_id, result=result, purpose="summary", now=now()))
            return
        await self._append(
            session.Summarize(turn_id=turn_id, summary=result.content.strip(), covers=covers, result=result, now=now())
        )

    async def _reject(self, request: Request, error: ErrorInfo) -> None:
        await request.respond(TURN_REPLY_CODEC.encode(TurnRejected(error=error)))
