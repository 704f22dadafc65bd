"""Rendering a session's log for an auditor: events in order, then the rebuilt state."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import assert_never

import msgspec

from actors import session
from actors.state_digest import state_digest
from bus.codec import encode
from eventstore.events import (
    DocumentsRetrieved,
    EventUnion,
    FactsExtracted,
    HistorySummarized,
    ItemDeleted,
    ItemsAdded,
    MemoryRecalled,
    MetadataUpdated,
    ModelCall,
    ModelCalled,
    PipelineChosen,
    PromptTrimmed,
    ReplyCompleted,
    ResponseDeleted,
    SessionOpened,
    ToolLoopStopped,
    ToolsCalled,
    TurnCancelled,
    TurnFailed,
    TurnStarted,
)
from eventstore.store import SessionInfo, StoredEvent

__all__ = [
    "Resolver",
    "describe",
    "referenced_sessions",
    "render_replay",
    "render_sessions",
    "replay_digest",
]

QUOTE_WIDTH = 400


def _call_line(call: ModelCall) -> str:
    line = f"engine {call.engine}, model {call.upstream_model}, {call.latency_ms:.1f} ms"
    if call.ttft_ms is not None:
        line += f" (first token {call.ttft_ms:.1f} ms)"
    if call.usage is not None:
        about = "~" if call.usage_estimated else ""
        line += (
            f", tokens {about}{call.usage.prompt_tokens} in / "
            f"{about}{call.usage.completion_tokens} out"
        )
        if call.usage_estimated:
            line += " (estimated)"
    if call.error is not None:
        line += f", FAILED ({call.status}): {call.error}"
    return line


def _quote(text: str) -> str:
    text = text.replace("\n", "\\n")
    return repr(text if len(text) <= QUOTE_WIDTH else text[:QUOTE_WIDTH] + "...")


Resolver = Callable[[str, int], str | None]


def _no_references(session_id: str, seq: int) -> str | None:
    return None


def describe(event: EventUnion, resolve: Resolver = _no_references) -> list[str]:
    """One event as a headline and indented detail lines.

    `resolve` finds the text of a memory recalled from another session, for as
    long as that session exists.
    """
    match event:
        case SessionOpened():
            return [f"session opened by tenant {event.tenant} (key {event.key_id})"]
        case TurnStarted():
            door = event.door or "chat.completions"
            head = (
                f"turn {event.turn_id} started through {door}: model {event.model}, "
                f"streaming {event.streaming}"
            )
            if event.pipeline is not None:
                head += f", pipeline {event.pipeline} (the model's only one)"
            lines = [head]
            if event.system is not None:
                lines.append(f"  client system prompt: {_quote(event.system)}")
            lines += [f"  {m.role}: {_quote(m.content)}" for m in event.messages]
            if event.params:
                lines.append(f"  params: {encode(event.params).decode()}")
            return lines
        case HistorySummarized():
            return [
                f"history summarized: the summary now covers the first {event.covers} messages",
                f"  summary: {_quote(event.summary)}",
            ]
        case ModelCalled():
            return [f"model called for the {event.call.purpose}: {_call_line(event.call)}"]
        case DocumentsRetrieved():
            if event.error is not None:
                return [f"knowledge search failed: {event.error}"]
            lines = [
                f"documents retrieved from {', '.join(event.collections)} for {_quote(event.query)}: {len(event.chunks)}"
            ]
            for n, c in enumerate(event.chunks, start=1):
                where = f"p. {c.page}" if c.page is not None else f"offset {c.offset}"
                lines.append(
                    f"  [{n}] {c.path} ({where}) chunk {c.chunk}, cos {c.similarity:.3f}, id {c.id}"
                )
            return lines
        case ToolsCalled():
            lines = [f"tools called: {len(event.results)}"]
            if event.assistant.content:
                lines.append(f"  assistant: {_quote(event.assistant.content)}")
            for r in event.results:
                outcome = f"ERROR {_quote(r.error)}" if r.error is not None else _quote(r.content)
                lines.append(f"  {r.name}({r.arguments}) -> {outcome} in {r.duration_ms:.1f} ms")
            return lines
        case ToolLoopStopped():
            return [
                f"tool loop stopped after {event.steps} steps ({event.reason}); answering without tools"
            ]
        case FactsExtracted():
            return [f"facts extracted from turn {event.turn_id}: {len(event.facts)}"] + [
                f"  - {_quote(f)}" for f in event.facts
            ]
        case PipelineChosen():
            head = f"pipeline {event.pipeline} chosen by {event.means}"
            if event.runner_up is not None:
                score = "" if event.runner_up_score is None else f" ({event.runner_up_score:.3f})"
                head += f"; runner-up {event.runner_up}{score}"
            lines = [head]
            if event.detail:
                lines.append(f"  why: {event.detail}")
            if event.scores:
                scores = ", ".join(
                    f"{k} {v:.3f}" for k, v in sorted(event.scores.items(), key=lambda kv: -kv[1])
                )
                lines.append(f"  scores: {scores}")
            return lines
        case MemoryRecalled():
            if event.error is not None:
                return [f"memory recall failed: {event.error}"]
            used = sum(h.used for h in event.hits)
            scope = f" and user {event.user_id}'s other sessions" if event.user_id else ""
            lines = [
                f"memory recalled {len(event.hits)} for {_quote(event.query)} (this session{scope}); {used} went into the prompt"
            ]
            for h in event.hits:
                text = h.text if h.text is not None else resolve(h.session_id, h.source_seq)
                shown = (
                    _quote(text) if text is not None else "[deleted: its session no longer exists]"
                )
                where = "" if h.text is not None else f" from {h.session_id}#{h.source_seq}"
                sim = f" cos {h.vector_similarity:.3f}" if h.vector_similarity is not None else ""
                bm25 = f" bm25 {h.bm25:.2f}" if h.bm25 is not None else ""
                mark = "USED" if h.used else "    "
                lines.append(f"  {mark} {h.score:.4f}{sim}{bm25} {h.role}{where}: {shown}")
            return lines
        case ReplyCompleted():
            head = (
                f"reply completed: finish {event.finish_reason}, {event.usage.total_tokens} tokens"
            )
            if event.call is not None:
                head += f"; model called: {_call_line(event.call)}"
            return [head, f"  assistant: {_quote(event.content)}"]
        case TurnFailed():
            return [f"turn {event.turn_id} failed: {event.status} {event.code}: {event.message}"]
        case TurnCancelled():
            lines = [
                (
                    f"turn {event.turn_id} cancelled ({event.reason}) after "
                    f"{event.usage.completion_tokens} completion tokens"
                )
            ]
            if event.content:
                lines.append(f"  partial assistant: {_quote(event.content)}")
            return lines
        case PromptTrimmed():
            cut = [f"{event.history_left_out} history messages"] if event.history_left_out else []
            cut += event.dropped
            head = (
                f"prompt trimmed to fit the context window ({event.window} tokens, "
                f"{event.reply_reserve} kept for the reply; prompt ~{event.prompt_tokens}): "
                f"left out {', '.join(cut)}"
            )
            return [head]
        case ItemsAdded():
            lines = [f"items added: {len(event.messages)} messages"]
            lines += [f"  {m.role}: {_quote(m.content)}" for m in event.messages]
            return lines
        case ItemDeleted():
            return [f"item msg_{event.item} deleted from the history"]
        case MetadataUpdated():
            return [f"metadata set: {encode(event.metadata).decode()}"]
        case ResponseDeleted():
            return [f"turn {event.turn_id} deleted as a response (its messages left the history)"]
        case _:
            assert_never(event)


def render_replay(
    session_id: str,
    stored: Sequence[StoredEvent],
    *,
    as_json: bool,
    resolve: Resolver = _no_references,
) -> Iterator[str]:
    state = session.fold([s.event for s in stored])
    # Events are numbered within the session (#1 is its first); `seq` is the stream's.
    if as_json:
        for n, item in enumerate(stored, 1):
            yield encode({"n": n, "seq": item.seq, "event": item.event}).decode()
        yield encode({"state": _state_summary(state)}).decode()
        return
    yield f"Session {session_id}: {len(stored)} events"
    for n, item in enumerate(stored, 1):
        lines = describe(item.event, resolve)
        stamp = item.event.at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        yield f"#{n:<6} {stamp}  [{item.event.__struct_config__.tag}] {lines[0]}"
        for line in lines[1:]:
            yield f"{'':>34}{line}"
    yield ""
    yield "Rebuilt state:"
    for key, value in _state_summary(state).items():
        if key != "history":
            yield f"  {key}: {value}"
    yield "  history:"
    for m in state.history:
        yield f"    {m.role}: {_quote(m.content)}"


def replay_digest(stored: Sequence[StoredEvent]) -> str:
    """The digest of the state the log alone folds to (`veil replay --digest`): what the
    live actor's `state_digest` must equal."""
    return state_digest(session.fold([s.event for s in stored]))


def _state_summary(state: session.SessionState) -> dict[str, object]:
    return {
        "session_id": state.session_id,
        "tenant": state.tenant,
        "created_at": state.created_at.isoformat() if state.created_at else None,
        "updated_at": state.updated_at.isoformat() if state.updated_at else None,
        "turns": state.turns,
        "events": state.events,
        "open_turn": state.open_turn.turn_id if state.open_turn else None,
        "pipeline": state.pipeline,
        "usage": msgspec.to_builtins(state.usage),
        "system": state.system,
        "summary": state.summary,
        "summarized_messages": state.summarized,
        "history": [msgspec.to_builtins(m) for m in state.history],
    }


class SessionRow(msgspec.Struct, frozen=True, kw_only=True):
    """One line of `veil sessions`."""

    session_id: str
    tenant: str | None
    user: str | None
    model: str | None
    turns: int
    events: int
    created_at: str | None
    last_activity: str | None


def session_row(info: SessionInfo, stored: Sequence[StoredEvent]) -> SessionRow:
    state = session.fold([s.event for s in stored])
    last = stored[-1].event.at if stored else state.updated_at
    return SessionRow(
        session_id=info.session_id,
        tenant=state.tenant,
        user=state.user_id,
        model=state.last_model,
        turns=state.turns,
        events=info.events,
        created_at=_stamp(state.created_at),
        last_activity=_stamp(last),
    )


def _stamp(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat(timespec="seconds").replace("+00:00", "Z")


def render_sessions(rows: Sequence[SessionRow], *, as_json: bool) -> Iterator[str]:
    """The sessions, the most recently active first."""
    ordered = sorted(rows, key=lambda r: (r.last_activity or "", r.session_id), reverse=True)
    if as_json:
        yield from (encode(row).decode() for row in ordered)
        return
    yield (
        f"{'SESSION':<34} {'TENANT':<14} {'USER':<14} {'MODEL':<16} {'TURNS':>5} "
        f"{'EVENTS':>6}  LAST ACTIVITY"
    )
    for r in ordered:
        yield (
            f"{r.session_id:<34} {_cell(r.tenant, 14)} {_cell(r.user, 14)} {_cell(r.model, 16)} "
            f"{r.turns:>5} {r.events:>6}  {r.last_activity or '-'}"
        )


def _cell(value: str | None, width: int) -> str:
    text = value or "-"
    return (text if len(text) <= width else text[: width - 1] + "…").ljust(width)


def referenced_sessions(stored: Sequence[StoredEvent]) -> set[str]:
    """Other sessions whose memories this log references."""
    return {
        h.session_id
        for item in stored
        if isinstance(item.event, MemoryRecalled)
        for h in item.event.hits
        if h.text is None
    }
