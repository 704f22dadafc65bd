"""A session's log read back as one trace per turn (pure: events in, traces out).

Every decision that shaped an answer is an event of the turn it belongs to, so a
turn's trace is a fold of the events carrying its id. Nothing here reads the
session's state: the trace shows what the log says, as an auditor would read it.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from contracts.turns import (
    MemoryStep,
    PipelineStep,
    RetrievalStep,
    ToolStep,
    TurnContent,
    TurnTrace,
)
from eventstore.events import (
    DocumentsRetrieved,
    EventUnion,
    FactsExtracted,
    HistorySummarized,
    MemoryRecalled,
    ModelCall,
    ModelCalled,
    PipelineChosen,
    PromptTrimmed,
    ReplyCompleted,
    ResponseDeleted,
    ToolLoopStopped,
    ToolsCalled,
    TurnCancelled,
    TurnFailed,
    TurnStarted,
)

__all__ = ["turn_traces"]

replace = msgspec.structs.replace


def _redact(call: ModelCall) -> ModelCall:
    """A failed call's error is operator detail (upstream address, exception): the
    caller keeps its status and sees that it failed, not why."""
    return call if call.error is None else replace(call, error="failed")


def _apply(trace: TurnTrace, event: EventUnion, details: bool) -> TurnTrace:
    match event:
        case PipelineChosen():
            step = PipelineStep(
                name=event.pipeline,
                means=event.means,
                detail=event.detail,
                scores=event.scores,
                runner_up=event.runner_up,
                runner_up_score=event.runner_up_score,
            )
            return replace(trace, pipeline=step)
        case HistorySummarized():
            return replace(trace, history_summarized=event.covers)
        case PromptTrimmed():
            return replace(trace, prompt_trimmed=[*trace.prompt_trimmed, *event.dropped])
        case MemoryRecalled():
            step_m = MemoryStep(query=event.query, hits=event.hits, error=event.error)
            return replace(trace, memory=[*trace.memory, step_m])
        case DocumentsRetrieved():
            step_r = RetrievalStep(
                collections=event.collections,
                query=event.query,
                chunks=event.chunks,
                error=event.error,
            )
            return replace(trace, retrieval=[*trace.retrieval, step_r])
        case ToolsCalled():
            step_t = ToolStep(step=len(trace.tools) + 1, results=event.results)
            return replace(trace, tools=[*trace.tools, step_t])
        case ToolLoopStopped():
            return replace(trace, tool_loop_stopped=event.reason)
        case ModelCalled():
            call = event.call if details else _redact(event.call)
            return replace(trace, model_calls=[*trace.model_calls, call])
        case FactsExtracted():
            return replace(trace, facts_extracted=len(event.facts))
        case ReplyCompleted():
            calls = trace.model_calls
            if event.call is not None:
                calls = [*calls, event.call if details else _redact(event.call)]
            return replace(
                trace,
                status="completed",
                ended_at=event.at,
                finish_reason=event.finish_reason,
                usage=event.usage,
                model_calls=calls,
            )
        case TurnFailed():
            return replace(
                trace,
                status="failed",
                ended_at=event.at,
                error_status=event.status,
                error_code=event.code,
            )
        case TurnCancelled():
            return replace(
                trace,
                status="cancelled",
                ended_at=event.at,
                usage=event.usage,
                cancel_reason=event.reason,
            )
        case _:
            return trace


def _words(trace: TurnTrace, event: EventUnion) -> TurnTrace:
    """The turn's answer into its content (when the trace carries content)."""
    words = trace.content
    if words is None:
        return trace
    match event:
        case ReplyCompleted():
            words = replace(words, output=event.content, tool_calls=event.tool_calls)
        case TurnCancelled():
            words = replace(words, output=event.content)
        case TurnFailed():
            words = replace(words, error_message=event.message)
        case _:
            return trace
    return replace(trace, content=words)


def turn_traces(
    events: Iterable[EventUnion], *, details: bool = False, content: bool = False
) -> list[TurnTrace]:
    """One trace per turn, in the order the turns started. `details` keeps failed
    calls' operator detail (for admins); `content` adds the turn's words."""
    traces: dict[str, TurnTrace] = {}
    for event in events:
        if isinstance(event, TurnStarted):
            pipeline = None
            if event.pipeline is not None:
                pipeline = PipelineStep(name=event.pipeline, means="only")
            words = None
            if content:
                words = TurnContent(
                    messages=event.messages,
                    system=event.system,
                    params=event.params,
                    metadata=event.metadata,
                )
            traces[event.turn_id] = TurnTrace(
                turn_id=event.turn_id,
                status="running",
                started_at=event.at,
                model=event.model,
                streaming=event.streaming,
                door=event.door or "chat.completions",
                messages=len(event.messages),
                pipeline=pipeline,
                content=words,
            )
            continue
        if isinstance(event, ResponseDeleted):
            # Deleted as a response: read back as if it never ran (the log keeps it).
            traces.pop(event.turn_id, None)
            continue
        turn_id = getattr(event, "turn_id", None)
        trace = traces.get(turn_id) if isinstance(turn_id, str) else None
        if trace is not None:
            traces[trace.turn_id] = _words(_apply(trace, event, details), event)
    return list(traces.values())
