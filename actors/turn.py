"""One turn as a pure workflow: from the session's state and what the last effect
returned, the events to record and the next effect to run.

Every decision of a turn lives here: the route when the router is away, when
history is folded into the summary, what recall and retrieval put into the
prompt, retries with backoff and then fallbacks, the hidden tool loop and its
limit, the split between the server's tools and the client's, how the turn ends
and whether facts are extracted after it. No clock, no I/O: the shell
(actors/session_actor.py) passes `now` in, runs each effect and appends the
events. Unit tests drive it with plain values (tests/actors/test_turn.py).

    step = begin(state, setup, now)
    while step.effect is not None:
        state = <state after appending step.events>
        step = advance(state, step.progress, <the effect's result>, now, cancelled)
    <append step.events, send step.reply, run step.after off the mailbox>
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, assert_never

import msgspec
from msgspec.structs import replace

from actors import session
from actors.engines import unsupported_parameter
from actors.knowledge.prompting import documents_block
from actors.memory.prompting import choose_memories, memory_block, prompt_texts
from actors.summary import facts_prompt, parse_facts, summary_prompt
from actors.tokens import MESSAGE_OVERHEAD, estimate_message_tokens, estimate_tokens
from bus.subjects import session_cancel, session_out
from config import Config, FallbackConfig, ModelConfig, PipelineConfig
from contracts.errors import ErrorInfo, error_info
from contracts.knowledge import KnowledgeHit, KnowledgeSearch
from contracts.memory import MemoryHit, RecallRequest
from contracts.model import GenerateRequest, GenerateResult
from contracts.router import RouteDecision, RouteRequest
from contracts.session import StartTurn, TurnDone, TurnError
from eventstore.events import (
    ChatMessage,
    DocumentsRetrieved,
    EventUnion,
    FactsExtracted,
    HistorySummarized,
    MemoryRecalled,
    ModelCall,
    ModelCalled,
    PipelineChosen,
    PromptTrimmed,
    RecalledMemory,
    ReplyCompleted,
    RetrievedChunk,
    ToolCall,
    ToolLoopStopped,
    ToolResult,
    ToolsCalled,
    TurnCancelled,
    TurnFailed,
    Usage,
)
from eventstore.knowledge import chunk_id

__all__ = [
    "AskRouter",
    "CallModel",
    "Effect",
    "ModelAnswered",
    "Observation",
    "Pause",
    "Paused",
    "Progress",
    "Recall",
    "Recalled",
    "Retrieve",
    "Retrieved",
    "Routed",
    "RunTools",
    "Step",
    "ToolsRan",
    "TurnSetup",
    "admit",
    "advance",
    "begin",
    "facts_recorded",
    "model_call",
    "model_called",
    "only_pipeline",
    "reply_completed",
]

FACTS_PARAMS: dict[str, Any] = {"temperature": 0.0, "max_tokens": 256}
SUMMARY_PARAMS: dict[str, Any] = {"temperature": 0.0}
CANCELLED = "The client went away."


class TurnSetup(msgspec.Struct, frozen=True, kw_only=True):
    """What the request and the configuration fix for the whole turn."""

    start: StartTurn
    model: ModelConfig
    pipelines: dict[str, PipelineConfig]
    # The schema of every server tool a pipeline may name, by name.
    tool_schemas: dict[str, dict[str, Any]] = {}
    memory_enabled: bool = True


# Effects: what the shell runs for the turn. Each answers with one observation.


class AskRouter(msgspec.Struct, frozen=True, kw_only=True):
    request: RouteRequest


class CallModel(msgspec.Struct, frozen=True, kw_only=True):
    link: FallbackConfig
    job: GenerateRequest
    purpose: Literal["reply", "summary", "facts"] = "reply"


class Recall(msgspec.Struct, frozen=True, kw_only=True):
    request: RecallRequest
    timeout: float


class Retrieve(msgspec.Struct, frozen=True, kw_only=True):
    request: KnowledgeSearch


class RunTools(msgspec.Struct, frozen=True, kw_only=True):
    calls: list[ToolCall]
    timeout: float
    # The turn's scope, for contextual tools (memory and knowledge search).
    context: dict[str, str | None]


class Pause(msgspec.Struct, frozen=True, kw_only=True):
    """Wait before the next attempt (cut short when the client leaves)."""

    seconds: float


Effect = AskRouter | CallModel | Recall | Retrieve | RunTools | Pause

# Observations: what an effect came back with.


class Routed(msgspec.Struct, frozen=True, kw_only=True):
    decision: RouteDecision | None = None
    # Why no decision came (no router runs, it timed out, it answered badly).
    failure: str | None = None


class ModelAnswered(msgspec.Struct, frozen=True, kw_only=True):
    # Bus failures come as a result with an error (actors.model_chain.call_model).
    result: GenerateResult


class Recalled(msgspec.Struct, frozen=True, kw_only=True):
    hits: list[MemoryHit] | None = None
    failure: str | None = None
    # No memory actor runs: memory is off, and nothing is recorded.
    absent: bool = False


class Retrieved(msgspec.Struct, frozen=True, kw_only=True):
    hits: list[KnowledgeHit] | None = None
    failure: str | None = None


class ToolsRan(msgspec.Struct, frozen=True, kw_only=True):
    results: list[ToolResult]


class Paused(msgspec.Struct, frozen=True, kw_only=True):
    pass


Observation = Routed | ModelAnswered | Recalled | Retrieved | ToolsRan | Paused

Phase = Literal["route", "fold", "recall", "retrieve", "reply", "pause", "tools"]


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """Where the turn stands between two effects."""

    setup: TurnSetup
    phase: Phase
    pipeline: str = ""
    # The fold in flight: history[:covers] goes into the summary.
    covers: int = 0
    # Recalled memories and retrieved documents, for the system prompt.
    memories: str | None = None
    documents: str | None = None
    # What the prompt last left out (dropped parts, history messages), once recorded.
    trimmed: tuple[tuple[str, ...], int] = ((), 0)
    params: dict[str, Any] = {}
    # Server tools the model may call now (none once the tool loop is out of steps).
    hidden: tuple[str, ...] = ()
    tool_steps: int = 0
    # The chain link and attempt of the model call in flight (or next, after a pause).
    link: int = 0
    attempt: int = 0
    # The model's answer whose server tool calls are running.
    pending: GenerateResult | None = None

    @property
    def turn_id(self) -> str:
        return self.setup.start.turn_id

    @property
    def config(self) -> PipelineConfig:
        return self.setup.pipelines[self.pipeline]


class Step(msgspec.Struct, frozen=True, kw_only=True):
    progress: Progress
    events: list[EventUnion] = []
    # Run this and `advance` with what it returns; None: the turn is over.
    effect: Effect | None = None
    # The turn is over: what its client gets (None: a cancelled stream, nobody listens).
    reply: TurnDone | TurnError | None = None
    # After the reply, off the session's mailbox: its result goes to `facts_recorded`.
    after: CallModel | None = None


def admit(config: Config, start: StartTurn) -> ErrorInfo | None:
    """Why the turn cannot run, before the log is touched: an unknown model, or a
    parameter that an engine which may answer cannot honour."""
    model = config.model(start.model)
    if model is None:
        return error_info(404, "model_not_found", f"The model '{start.model}' does not exist.")
    for name in model.candidates:
        for link in config.pipelines[name].chain:
            param = unsupported_parameter(config.engines[link.engine].kind, start.params)
            if param is not None:
                message = f"The parameter '{param}' is not supported by the model '{start.model}'."
                return ErrorInfo(
                    status=400,
                    type="invalid_request_error",
                    code="unsupported_parameter",
                    message=message,
                    param=param,
                )
    return None


def only_pipeline(model: ModelConfig) -> str | None:
    """The pipeline of a model that has one: the choice needs no router (TurnStarted records it)."""
    return model.candidates[0] if len(model.candidates) == 1 else None


def begin(state: session.SessionState, setup: TurnSetup, now: datetime) -> Step:
    """The first step of a turn whose TurnStarted is in `state`."""
    progress = Progress(setup=setup, phase="route")
    only = only_pipeline(setup.model)
    if only is not None:
        return _routed(state, replace(progress, pipeline=only), [], now)
    start = setup.start
    text = next((m.content for m in reversed(start.messages) if m.role == "user"), "")
    pinned = _pinned(state, setup.model)
    ask = RouteRequest(model=start.model, text=text, metadata=start.metadata, pinned=pinned)
    return Step(progress=progress, effect=AskRouter(request=ask))


def advance(
    state: session.SessionState,
    progress: Progress,
    seen: Observation,
    now: datetime,
    cancelled: bool = False,
) -> Step:
    """The next step, from what the last effect returned (`cancelled`: the client left)."""
    answered = seen.result if isinstance(seen, ModelAnswered) else None
    if cancelled or (answered is not None and answered.cancelled):
        # What was done is recorded: the answer's call cut short (with what it produced
        # so far), a tool step that finished.
        reply = answered if progress.phase == "reply" else None
        done: list[EventUnion] = []
        if isinstance(seen, ToolsRan):
            done = _tool_step(progress, seen, now)
        elif reply is not None:
            done = [model_called(progress.turn_id, reply, now)]
        return _cancelled(progress, done, reply, now)
    match seen:
        case Routed():
            return _on_routed(state, progress, seen, now)
        case ModelAnswered() if progress.phase == "fold":
            return _on_folded(state, progress, seen.result, now)
        case ModelAnswered():
            return _on_answer(state, progress, seen.result, now)
        case Recalled():
            return _on_recalled(state, progress, seen, now)
        case Retrieved():
            return _on_retrieved(state, progress, seen, now)
        case ToolsRan():
            return _on_tools_ran(state, progress, seen, now)
        case Paused():
            return _call(state, replace(progress, attempt=progress.attempt + 1), [], now)
        case _:
            assert_never(seen)


def facts_recorded(turn_id: str, result: GenerateResult, now: datetime) -> list[EventUnion]:
    """What a fact extraction leaves in the log: its call, and the facts if any."""
    events: list[EventUnion] = [model_called(turn_id, result, now, "facts")]
    facts = [] if result.error else parse_facts(result.content)
    if facts:
        events.append(FactsExtracted(at=now, turn_id=turn_id, facts=facts))
    return events


def model_call(result: GenerateResult, purpose: str = "reply") -> ModelCall:
    return ModelCall(
        purpose=purpose,
        engine=result.engine,
        upstream_model=result.upstream_model,
        latency_ms=result.latency_ms,
        ttft_ms=result.ttft_ms,
        # A failed call that produced nothing has nothing to count.
        usage=None if result.error and result.usage == Usage() else result.usage,
        usage_estimated=result.usage_estimated,
        finish_reason=None if result.error else result.finish_reason,
        error=_operators_view(result.error) if result.error else None,
        status=result.error.status if result.error else None,
    )


def reply_completed(turn_id: str, result: GenerateResult, now: datetime) -> ReplyCompleted:
    return ReplyCompleted(
        at=now,
        turn_id=turn_id,
        content=result.content,
        finish_reason=result.finish_reason,
        usage=result.usage,
        tool_calls=result.tool_calls,
        alternatives=result.alternatives,
        call=model_call(result),
    )


def _operators_view(error: ErrorInfo) -> str:
    """The error as the log keeps it: the client's message, and what only operators see."""
    return error.message if error.detail is None else f"{error.message} ({error.detail})"


def model_called(
    turn_id: str, result: GenerateResult, now: datetime, purpose: str = "reply"
) -> ModelCalled:
    return ModelCalled(at=now, turn_id=turn_id, call=model_call(result, purpose))


# The steps, in the order a turn takes them: route, fold, recall, retrieve, reply.


def _on_routed(
    state: session.SessionState, progress: Progress, seen: Routed, now: datetime
) -> Step:
    decision = seen.decision
    if decision is None:
        # No router: the pinned pipeline, or the model's default.
        pinned = _pinned(state, progress.setup.model)
        decision = RouteDecision(
            pipeline=pinned or progress.setup.model.candidates[0],
            means="pinned" if pinned else "default",
            detail=f"router unavailable: {seen.failure}",
        )
    chosen = PipelineChosen(
        at=now,
        turn_id=progress.turn_id,
        pipeline=decision.pipeline,
        means=decision.means,
        detail=decision.detail,
        scores=decision.scores,
        runner_up=decision.runner_up,
        runner_up_score=decision.runner_up_score,
    )
    return _routed(state, replace(progress, pipeline=decision.pipeline), [chosen], now)


def _pinned(state: session.SessionState, model: ModelConfig) -> str | None:
    """The pipeline that answered the session last, when the model keeps sessions on it."""
    return state.pipeline if model.pin and state.pipeline in model.candidates else None


def _routed(
    state: session.SessionState, progress: Progress, events: list[EventUnion], now: datetime
) -> Step:
    pipeline = progress.setup.pipelines[progress.pipeline]
    params = pipeline.params.under(progress.setup.start.params)
    hidden = tuple(pipeline.tools)
    if hidden:
        schemas = [progress.setup.tool_schemas[name] for name in hidden]
        params["tools"] = [*params.get("tools", []), *schemas]
    progress = replace(progress, params=params, hidden=hidden)
    if pipeline.summarize:
        covers = session.fold_plan(_ahead(state, events), pipeline.budget)
        if covers is not None:
            return _fold(state, progress, covers, events)
    return _recall(state, progress, events, now)


def _fold(
    state: session.SessionState, progress: Progress, covers: int, events: list[EventUnion]
) -> Step:
    pipeline = progress.config
    state = _ahead(state, events)
    job = GenerateRequest(
        turn_id=progress.turn_id,
        upstream_model=pipeline.model,
        messages=summary_prompt(state.summary, state.history[state.summarized : covers]),
        params=SUMMARY_PARAMS,
    )
    link = FallbackConfig(engine=pipeline.engine, model=pipeline.model)
    return Step(
        progress=replace(progress, phase="fold", covers=covers),
        events=events,
        effect=CallModel(link=link, job=job, purpose="summary"),
    )


def _on_folded(
    state: session.SessionState, progress: Progress, result: GenerateResult, now: datetime
) -> Step:
    """A failed summary is recorded and changes nothing: the turns stay in the
    history, and this prompt leaves out the oldest of them instead."""
    events: list[EventUnion] = [model_called(progress.turn_id, result, now, "summary")]
    summary = result.content.strip()
    if result.error is None and summary:
        events.append(
            HistorySummarized(
                at=now, turn_id=progress.turn_id, summary=summary, covers=progress.covers
            )
        )
    return _recall(state, progress, events, now)


def _recall(
    state: session.SessionState, progress: Progress, events: list[EventUnion], now: datetime
) -> Step:
    """Ask long-term memory about this turn, unless it cannot add to the prompt."""
    pipeline, setup = progress.config, progress.setup
    ahead = _ahead(state, events)
    query = session.turn_query(ahead)
    if (
        not setup.memory_enabled
        or not pipeline.memory.recall
        or ahead.tenant is None
        or not query.strip()
        or not session.recall_may_add(ahead, pipeline.budget)
    ):
        return _retrieve(state, progress, events, now)
    ask = RecallRequest(
        tenant=ahead.tenant,
        session_id=setup.start.session_id,
        user_id=ahead.user_id,
        query=query,
        k=pipeline.memory.k,
    )
    return Step(
        progress=replace(progress, phase="recall"),
        events=events,
        effect=Recall(request=ask, timeout=pipeline.memory.timeout),
    )


def _on_recalled(
    state: session.SessionState, progress: Progress, seen: Recalled, now: datetime
) -> Step:
    if seen.absent:
        return _retrieve(state, progress, [], now)
    pipeline = progress.config
    query = session.turn_query(state)
    if seen.hits is None:
        recalled = MemoryRecalled(
            at=now,
            turn_id=progress.turn_id,
            query=query,
            user_id=state.user_id,
            error=seen.failure,
        )
        return _retrieve(state, progress, [recalled], now)
    in_prompt = prompt_texts(session.prompt(state, None, pipeline.budget))
    used = choose_memories(seen.hits, in_prompt, pipeline.memory)
    session_id = progress.setup.start.session_id
    recalled = MemoryRecalled(
        at=now,
        turn_id=progress.turn_id,
        query=query,
        user_id=state.user_id,
        hits=[_recalled_memory(h, h in used, session_id) for h in seen.hits],
    )
    if used:
        progress = replace(progress, memories=memory_block(used, session_id))
    return _retrieve(state, progress, [recalled], now)


def _recalled_memory(hit: MemoryHit, used: bool, session_id: str) -> RecalledMemory:
    return RecalledMemory(
        id=hit.id,
        session_id=hit.session_id,
        source_seq=hit.source_seq,
        kind=hit.kind,
        role=hit.role,
        score=round(hit.score, 6),
        vector_similarity=_rounded(hit.vector_similarity),
        bm25=_rounded(hit.bm25),
        used=used,
        # Another session's text stays out of this session's log.
        text=hit.text if hit.session_id == session_id else None,
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _retrieve(
    state: session.SessionState, progress: Progress, events: list[EventUnion], now: datetime
) -> Step:
    """Search the pipeline's knowledge collections for this turn."""
    pipeline = progress.config
    query = session.turn_query(_ahead(state, events))
    if not pipeline.knowledge or not query.strip():
        return _call(state, progress, events, now)
    ask = KnowledgeSearch(
        collections=pipeline.knowledge,
        query=query,
        k=pipeline.knowledge_k,
        threshold=pipeline.knowledge_threshold,
    )
    return Step(
        progress=replace(progress, phase="retrieve"), events=events, effect=Retrieve(request=ask)
    )


def _on_retrieved(
    state: session.SessionState, progress: Progress, seen: Retrieved, now: datetime
) -> Step:
    pipeline = progress.config
    hits = seen.hits or []
    retrieved = DocumentsRetrieved(
        at=now,
        turn_id=progress.turn_id,
        collections=pipeline.knowledge,
        query=session.turn_query(state),
        error=seen.failure,
        chunks=[_retrieved_chunk(h) for h in hits],
    )
    if hits:
        progress = replace(progress, documents=documents_block(hits, cite=pipeline.cite_sources))
    return _call(state, progress, [retrieved], now)


def _retrieved_chunk(hit: KnowledgeHit) -> RetrievedChunk:
    return RetrievedChunk(
        id=chunk_id(hit.collection, hit.sha256, hit.chunk),
        collection=hit.collection,
        path=hit.path,
        sha256=hit.sha256,
        chunk=hit.chunk,
        offset=hit.position.offset,
        page=hit.position.page,
        score=round(hit.score, 6),
        similarity=round(hit.similarity, 6),
    )


def _call(
    state: session.SessionState, progress: Progress, events: list[EventUnion], now: datetime
) -> Step:
    """Ask the model of the current chain link for the answer."""
    pipeline, start = progress.config, progress.setup.start
    link = pipeline.chain[progress.link]
    messages, trimmed = _fit(_ahead(state, events), progress, now)
    if trimmed is not None and (tuple(trimmed.dropped), trimmed.history_left_out) != (
        progress.trimmed
    ):
        events = [*events, trimmed]
        progress = replace(progress, trimmed=(tuple(trimmed.dropped), trimmed.history_left_out))
    job = GenerateRequest(
        turn_id=start.turn_id,
        upstream_model=link.model,
        messages=messages,
        params=progress.params,
        out_subject=(
            session_out(start.tenant, start.session_id, start.turn_id) if start.stream else None
        ),
        cancel_subject=session_cancel(start.tenant, start.session_id, start.turn_id),
        hidden_tools=list(progress.hidden),
    )
    return Step(
        progress=replace(progress, phase="reply"),
        events=events,
        effect=CallModel(link=link, job=job),
    )


# What gives way first when the prompt outgrows the window (history then keeps its newest).
GIVES_WAY = ("memories", "documents", "summary")


def _fit(
    state: session.SessionState, progress: Progress, now: datetime
) -> tuple[list[ChatMessage], PromptTrimmed | None]:
    """The prompt, every part of it in one budget: the context window less what the
    reply may take. The system prompts and the turn's own messages always go in."""
    pipeline = progress.config
    window = pipeline.context_window
    reserve = reply_reserve(progress.params, window)
    room = window - reserve
    open_turn = state.open_turn
    fixed = [p for p in (pipeline.system_prompt, state.system) if p]
    spent = sum(estimate_tokens(p) for p in fixed) + MESSAGE_OVERHEAD
    if open_turn is not None:
        spent += estimate_message_tokens((*open_turn.messages, *open_turn.steps))
    summary = f"{session.SUMMARY_HEADER}\n{state.summary}" if state.summary else None
    parts = {"memories": progress.memories, "documents": progress.documents, "summary": summary}
    cost = {name: estimate_tokens(text) + 2 for name, text in parts.items() if text}
    dropped: list[str] = []
    for name in GIVES_WAY:
        if spent + sum(cost.values()) <= room:
            break
        if name in cost:
            del cost[name]
            dropped.append(name)
    budget = max(0, min(pipeline.budget, room - spent - sum(cost.values())))
    context = [parts[name] for name in ("memories", "documents") if name in cost]
    messages = session.prompt(
        state,
        pipeline.system_prompt,
        budget,
        "\n\n".join(t for t in context if t) or None,
        summary="summary" in cost,
    )
    kept_from = session.fitting_tail(state.history, budget, state.summarized)
    left_out = kept_from - state.summarized
    if not dropped and not left_out:
        return messages, None
    trimmed = PromptTrimmed(
        at=now,
        turn_id=progress.turn_id,
        dropped=dropped,
        history_left_out=left_out,
        window=window,
        reply_reserve=reserve,
        prompt_tokens=estimate_message_tokens(messages),
    )
    return messages, trimmed


def reply_reserve(params: dict[str, Any], window: int) -> int:
    """What the window keeps for the reply: the request's token limit, else a quarter."""
    limit = params.get("max_completion_tokens") or params.get("max_tokens")
    if isinstance(limit, int) and limit > 0:
        return min(limit, window)
    return window // 4


def _on_answer(
    state: session.SessionState, progress: Progress, result: GenerateResult, now: datetime
) -> Step:
    if result.error is not None:
        return _on_failed_call(state, progress, result, result.error, now)
    pipeline = progress.config
    server_calls = [c for c in result.tool_calls if c.function.name in progress.hidden]
    if not server_calls:
        return _completed(state, progress, result, now)
    if progress.tool_steps >= pipeline.max_tool_steps:
        # Out of steps: record it, and ask once more for an answer without tools.
        stopped = ToolLoopStopped(at=now, turn_id=progress.turn_id, steps=progress.tool_steps)
        events: list[EventUnion] = [stopped, model_called(progress.turn_id, result, now)]
        params = {**progress.params, "tool_choice": "none"}
        restart = replace(progress, params=params, hidden=(), link=0, attempt=0)
        return _call(state, restart, events, now)
    context = {
        "tenant": state.tenant,
        "session_id": progress.setup.start.session_id,
        "user_id": state.user_id,
        "collections": ",".join(pipeline.knowledge),
    }
    run = RunTools(calls=server_calls, timeout=pipeline.tool_timeout, context=context)
    return Step(progress=replace(progress, phase="tools", pending=result), effect=run)


def _on_failed_call(
    state: session.SessionState,
    progress: Progress,
    result: GenerateResult,
    error: ErrorInfo,
    now: datetime,
) -> Step:
    """Retry the link with backoff, then fall back along the chain; a stream that
    already reached the client is never restarted on another model."""
    pipeline = progress.config
    last_link = progress.link == len(pipeline.chain) - 1
    last_try = progress.attempt == pipeline.retries
    if result.deltas > 0 or not error.retryable or (last_link and last_try):
        return _failed(progress, result, error, now)
    events: list[EventUnion] = [model_called(progress.turn_id, result, now)]
    if last_try:
        return _call(state, replace(progress, link=progress.link + 1, attempt=0), events, now)
    wait = (
        error.retry_after
        if error.retry_after is not None
        else (pipeline.retry_backoff * 2**progress.attempt)
    )
    pause = Pause(seconds=min(wait, pipeline.max_retry_wait))
    return Step(progress=replace(progress, phase="pause"), events=events, effect=pause)


def _tool_step(progress: Progress, seen: ToolsRan, now: datetime) -> list[EventUnion]:
    """The model call that asked for the server's tools, and what they answered."""
    result = progress.pending
    assert result is not None
    step = ToolsCalled(
        at=now,
        turn_id=progress.turn_id,
        assistant=ChatMessage(
            role="assistant", content=result.content, tool_calls=tuple(result.tool_calls)
        ),
        results=seen.results,
    )
    return [model_called(progress.turn_id, result, now), step]


def _on_tools_ran(
    state: session.SessionState, progress: Progress, seen: ToolsRan, now: datetime
) -> Step:
    result = progress.pending
    assert result is not None
    events = _tool_step(progress, seen, now)
    progress = replace(progress, tool_steps=progress.tool_steps + 1, pending=None)
    client_calls = [c for c in result.tool_calls if c.function.name not in progress.hidden]
    if client_calls:
        # The client answers its own calls; the server's are already in the steps.
        asked = replace(result, content="", tool_calls=client_calls, finish_reason="tool_calls")
        return _completed(state, progress, asked, now, events)
    return _call(state, replace(progress, link=0, attempt=0), events, now)


# How a turn ends.


def _completed(
    state: session.SessionState,
    progress: Progress,
    result: GenerateResult,
    now: datetime,
    events: list[EventUnion] | None = None,
) -> Step:
    reply = reply_completed(progress.turn_id, result, now)
    done = TurnDone(
        content=result.content,
        finish_reason=result.finish_reason,
        usage=result.usage,
        deltas=result.deltas,
        tool_calls=result.tool_calls,
        alternatives=result.alternatives,
    )
    return Step(
        progress=progress,
        events=[*(events or []), reply],
        reply=done,
        after=_extract_facts(state, progress, result),
    )


def _extract_facts(
    state: session.SessionState, progress: Progress, result: GenerateResult
) -> CallModel | None:
    pipeline = progress.config
    if not pipeline.memory.extract_facts or state.open_turn is None:
        return None
    exchange = [*state.open_turn.messages, ChatMessage(role="assistant", content=result.content)]
    link = pipeline.chain[0]
    job = GenerateRequest(
        turn_id=progress.turn_id,
        upstream_model=link.model,
        messages=facts_prompt(exchange),
        params=FACTS_PARAMS,
    )
    return CallModel(link=link, job=job, purpose="facts")


def _failed(
    progress: Progress, result: GenerateResult | None, error: ErrorInfo, now: datetime
) -> Step:
    events: list[EventUnion] = []
    if result is not None:
        events.append(model_called(progress.turn_id, result, now))
    events.append(
        TurnFailed(
            at=now,
            turn_id=progress.turn_id,
            status=error.status,
            code=error.code,
            message=error.message,
        )
    )
    reply = TurnError(
        error=replace(error, detail=None),  # the client's view; the details are in the log
        content=result.content if result else "",
        deltas=result.deltas if result else 0,
    )
    return Step(progress=progress, events=events, reply=reply)


def _cancelled(
    progress: Progress, done: list[EventUnion], result: GenerateResult | None, now: datetime
) -> Step:
    events = [
        *done,
        TurnCancelled(
            at=now,
            turn_id=progress.turn_id,
            content=result.content if result else "",
            usage=result.usage if result else Usage(),
            reason="client_disconnected",
        ),
    ]
    # A request always gets its answer, even if nobody reads it; a stream has no reader.
    reply = None
    if not progress.setup.start.stream:
        reply = TurnError(error=error_info(499, "turn_cancelled", CANCELLED))
    return Step(progress=progress, events=events, reply=reply)


def _ahead(state: session.SessionState, events: list[EventUnion]) -> session.SessionState:
    """The state once `events` are recorded (the shell appends them before it runs the effect)."""
    return session.fold(events, state) if events else state
