"""The steps of a turn around the model call: summary, recall, retrieval, tools, facts."""

from __future__ import annotations

import asyncio

import structlog
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from actors import session
from actors._session_common import SessionPart
from actors.knowledge.actor import ask_knowledge
from actors.knowledge.prompting import documents_block
from actors.memory.actor import ask_recall
from actors.memory.prompting import choose_memories, memory_block
from actors.model_chain import call_model
from actors.summary import facts_prompt, parse_facts, summary_prompt
from bus.codec import DecodeError
from bus.requests import nats_request
from bus.subjects import (
    TOOLS_RUN,
    model_generate,
)
from config import PipelineConfig
from contracts.knowledge import KnowledgeSearch
from contracts.memory import RecallRequest
from contracts.model import GENERATE_CODEC, GENERATE_RESULT_CODEC, GenerateRequest
from contracts.session import StartTurn
from contracts.tools import RUN_CODEC, RUN_REPLY_CODEC, RunTool, ToolRan
from eventstore.events import (
    ChatMessage,
    DocumentsRetrieved,
    MemoryRecalled,
    RecalledMemory,
    RetrievedChunk,
    ToolCall,
    ToolResult,
)
from eventstore.knowledge import chunk_id

__all__ = ["TurnSteps"]

log = structlog.get_logger("veil.session")


class TurnSteps(SessionPart):
    """Mixed into SessionActor: each step records what it did as events."""

    async def _extract_facts(
        self, turn_id: str, pipeline: PipelineConfig, exchange: list[ChatMessage]
    ) -> None:
        link = pipeline.chain[0]
        job = GenerateRequest(
            turn_id=turn_id,
            upstream_model=link.model,
            messages=facts_prompt(exchange),
            params={"temperature": 0.0, "max_tokens": 256},
        )
        result = await call_model(
            self._ctx.nc, link, job, timeout=self._ctx.config.server.turn_timeout
        )
        facts = [] if result.error else parse_facts(result.content)
        await self._append(
            session.RecordFacts(turn_id=turn_id, facts=facts, result=result, now=self._ctx.clock())
        )

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
            ask = RunTool(
                name=call.function.name,
                arguments=call.function.arguments,
                timeout=timeout,
                context=context,
            )
            try:
                reply = await nats_request(
                    self._ctx.nc, TOOLS_RUN, RUN_CODEC.encode(ask), timeout=timeout + 5
                )
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
        query = session.turn_query(state)
        if not query.strip():
            return None
        ask = KnowledgeSearch(
            collections=pipeline.knowledge,
            query=query,
            k=pipeline.knowledge_k,
            threshold=pipeline.knowledge_threshold,
        )
        now = self._ctx.clock()
        try:
            hits = await ask_knowledge(self._ctx.nc, ask, timeout=10)
        except (NoRespondersError, NatsTimeout, DecodeError) as failure:
            retrieved = DocumentsRetrieved(
                at=now,
                turn_id=start.turn_id,
                collections=pipeline.knowledge,
                query=query,
                error=repr(failure),
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
        if (
            not self._ctx.config.memory.enabled
            or not policy.recall
            or state.open_turn is None
            or state.tenant is None
            or not session.recall_may_add(state, pipeline.budget)
        ):
            return None
        query = session.turn_query(state)
        if not query.strip():
            return None
        ask = RecallRequest(
            tenant=state.tenant,
            session_id=self.session_id,
            user_id=state.user_id,
            query=query,
            k=policy.k,
        )
        now = self._ctx.clock()
        try:
            hits = await ask_recall(self._ctx.nc, ask, timeout=policy.timeout)
        except NoRespondersError:
            return None  # no memory actor runs: memory is off
        except (NatsTimeout, DecodeError) as failure:
            recalled = MemoryRecalled(
                at=now,
                turn_id=start.turn_id,
                query=query,
                user_id=state.user_id,
                error=repr(failure),
            )
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
                    vector_similarity=None
                    if h.vector_similarity is None
                    else round(h.vector_similarity, 6),
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
            messages=summary_prompt(state.summary, state.history[state.summarized : covers]),
            params={"temperature": 0.0},
        )
        now = self._ctx.clock
        try:
            reply = await nats_request(
                self._ctx.nc,
                model_generate(pipeline.engine),
                GENERATE_CODEC.encode(job),
                timeout=self._ctx.config.server.turn_timeout,
            )
            result = GENERATE_RESULT_CODEC.decode(reply.data)
        except (NoRespondersError, NatsTimeout, DecodeError) as failure:
            log.warning("session.summary_failed", session=self.session_id, error=repr(failure))
            return
        if result.error is not None or not result.content.strip():
            await self._append(
                session.RecordModelCall(
                    turn_id=turn_id, result=result, purpose="summary", now=now()
                )
            )
            return
        await self._append(
            session.Summarize(
                turn_id=turn_id,
                summary=result.content.strip(),
                covers=covers,
                result=result,
                now=now(),
            )
        )
