"""A chat session as three pure functions: initial, decide, evolve.

No clock, no ids, no I/O here: the shell (actors/session_actor.py) puts
timestamps and ids into commands, and `evolve` is replayed by auditors.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import assert_never

import msgspec
from msgspec.structs import replace

from actors.errors import (
    AlreadyHandled,
    IdempotencyMismatch,
    ItemNotFound,
    NothingNew,
    ResponseNotFound,
    SessionExists,
    SessionNotFound,
    TurnInProgress,
    UnknownToolCall,
)
from actors.tokens import message_tokens
from contracts.conversations import (
    AddItems,
    ConversationEdit,
    DeleteItem,
    DeleteResponse,
    OpenConversation,
    UpdateMetadata,
)
from contracts.errors import ErrorInfo, error_type
from contracts.session import SessionView, StartTurn
from eventstore.events import (
    ChatMessage,
    DocumentsRetrieved,
    EventUnion,
    FactsExtracted,
    HistorySummarized,
    ItemDeleted,
    ItemsAdded,
    MemoryRecalled,
    MetadataUpdated,
    ModelCalled,
    PipelineChosen,
    PromptTrimmed,
    ReplyCompleted,
    ResponseDeleted,
    SessionOpened,
    ToolCall,
    ToolLoopStopped,
    ToolsCalled,
    TurnCancelled,
    TurnFailed,
    TurnStarted,
    Usage,
)

__all__ = [
    "Command",
    "Edit",
    "OpenTurn",
    "OpenTurnState",
    "Record",
    "SessionState",
    "TurnOutcome",
    "decide",
    "evolve",
    "fitting_tail",
    "fold",
    "fold_plan",
    "initial",
    "item_numbers",
    "owned",
    "prompt",
    "recall_may_add",
    "session_view",
    "turn_query",
]

SYSTEM_ROLES = frozenset({"system", "developer"})


class OpenTurnState(msgspec.Struct, frozen=True, kw_only=True):
    turn_id: str
    command_id: str
    model: str
    messages: tuple[ChatMessage, ...]
    lease_until: datetime
    # The hidden tool loop so far: the model's tool calls and the server tools' answers.
    steps: tuple[ChatMessage, ...] = ()
    holder: str | None = None
    fingerprint: str | None = None


class TurnOutcome(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    turn_id: str
    status: str  # completed | failed | cancelled
    content: str = ""
    finish_reason: str = "stop"
    usage: Usage = Usage()
    error: ErrorInfo | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    # The digest of the request that ran the turn (retries must match it).
    fingerprint: str | None = None


class SessionState(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str | None = None
    tenant: str | None = None
    key_id: str | None = None
    # Pinned when the session opens: memory is scoped to this user's sessions.
    user_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    # The client's latest system prompt; it persists until the client sends another.
    system: str | None = None
    # Messages of completed turns, in order: what the model sees as the past.
    history: tuple[ChatMessage, ...] = ()
    # A running summary of history[:summarized], which prompts carry instead of them.
    summary: str | None = None
    summarized: int = 0
    open_turn: OpenTurnState | None = None
    # The public model of the latest turn, and the pipeline that last answered it.
    last_model: str | None = None
    pipeline: str | None = None
    # Outcome of every handled command, by command id: retries answer from here.
    outcomes: dict[str, TurnOutcome] = {}
    turns: int = 0
    events: int = 0
    usage: Usage = Usage()
    # What long-term memory holds of this session that its history never carries:
    # messages of failed and cancelled turns, extracted facts.
    beyond_history: int = 0
    # Conversations: the session's metadata, and the numbers of the items (history
    # messages) deleted, sorted. A message's item number is its position among every
    # message the history ever held, so it never changes (see `item_numbers`).
    metadata: dict[str, str] = {}
    deleted_items: tuple[int, ...] = ()
    # Every closed turn not deleted as a response (/v1/responses): the item number of
    # its first history message and how many it added (none, failed or cancelled).
    turn_items: dict[str, tuple[int, int]] = {}


# Commands: the shell fills in `now` and everything else non-deterministic.


class OpenTurn(msgspec.Struct, frozen=True, kw_only=True):
    start: StartTurn
    now: datetime
    lease_until: datetime
    # The pipeline, when the model has only one (recorded in TurnStarted itself).
    pipeline: str | None = None
    # The worker that will run the turn: it holds the lease.
    holder: str | None = None
    # An open turn whose holder said it no longer runs it (the worker died or dropped it):
    # it is failed at once instead of waiting out its lease.
    holder_gone: str | None = None


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """Record what a turn's workflow (actors/turn.py) decided, while the turn is open;
    `after_turn`: after it closed (a fact extraction), while the session exists."""

    turn_id: str
    events: tuple[EventUnion, ...]
    after_turn: bool = False


class Edit(msgspec.Struct, frozen=True, kw_only=True):
    """A conversation changed without a turn (/v1/conversations)."""

    edit: ConversationEdit
    now: datetime


Command = OpenTurn | Record | Edit


def initial() -> SessionState:
    return SessionState()


def fold(events: list[EventUnion], state: SessionState | None = None) -> SessionState:
    state = initial() if state is None else state
    for event in events:
        state = evolve(state, event)
    return state


def _split_messages(
    history: tuple[ChatMessage, ...], messages: list[ChatMessage]
) -> tuple[str | None, list[ChatMessage]]:
    """The client's system prompt and the messages that are new to the session.

    Clients written for stateless OpenAI resend the whole conversation; when
    what they send starts with the stored history, only the rest is new.
    """
    system_parts = [m.content for m in messages if m.role in SYSTEM_ROLES]
    dialogue = [m for m in messages if m.role not in SYSTEM_ROLES]
    n = len(history)
    if n and len(dialogue) > n and tuple(dialogue[:n]) == history:
        dialogue = dialogue[n:]
    system = "\n\n".join(system_parts) if system_parts else None
    return system, dialogue


def _same_request(recorded: str | None, start: StartTurn) -> None:
    """A retry must be the same request: an Idempotency-Key reused with another body is refused."""
    if recorded is not None and start.fingerprint is not None and recorded != start.fingerprint:
        raise IdempotencyMismatch(
            "This Idempotency-Key was already used with a different request; "
            "use a new key for a new request."
        )


def _unanswered_tool_call(history: tuple[ChatMessage, ...], new: list[ChatMessage]) -> str | None:
    """The id of a tool message in `new` that answers no call of the assistant message
    just before it (past other tool answers), or None when every one does. One pass."""
    i = len(history) - 1
    while i >= 0 and history[i].role == "tool":
        i -= 1
    last = history[i] if i >= 0 else None
    calls = {c.id for c in last.tool_calls or ()} if last and last.role == "assistant" else set()
    for message in new:
        if message.role == "tool":
            if message.tool_call_id not in calls:
                return message.tool_call_id or ""
        elif message.role == "assistant":
            calls = {c.id for c in message.tool_calls or ()}
        else:
            calls = set()
    return None


def _decide_open(state: SessionState, cmd: OpenTurn) -> list[EventUnion]:
    start = cmd.start
    # A retry of a command whose run was closed unfinished, or whose worker is gone now.
    again = False
    if state.session_id is not None and state.tenant == start.tenant:
        # A retry, of a new session's first turn too, answers from what was recorded.
        outcome = state.outcomes.get(start.command_id)
        if outcome is not None:
            _same_request(outcome.fingerprint, start)
            if not ended_unanswered(outcome):
                raise AlreadyHandled(outcome.turn_id, outcome)
            # Nothing answered it (its client left, its worker was lost, its lease
            # lapsed): it runs again rather than replaying how it ended.
            again = True
        if state.open_turn is not None and state.open_turn.command_id == start.command_id:
            _same_request(state.open_turn.fingerprint, start)
            if cmd.holder_gone != state.open_turn.turn_id:
                raise AlreadyHandled(state.open_turn.turn_id, None)
            # Its worker is gone: the retry closes that turn (below) and runs it again.
            again = True
    if start.new_session:
        if state.session_id is not None and not again:
            raise SessionExists(f"session {start.session_id} already exists")
    elif state.session_id is not None and not owned(
        state, start.tenant, start.user_id if start.user_bound else None
    ):
        # Another user's session of the tenant, for a key pinned to one user.
        raise SessionNotFound(f"No session found with id '{start.session_id}'.")
    events: list[EventUnion] = []
    if state.session_id is None:
        # A new session: one the gateway named, or a name the client chose (opened on
        # its first use, as chat front ends with their own conversation ids expect).
        events.append(
            SessionOpened(
                at=cmd.now,
                session_id=start.session_id,
                tenant=start.tenant,
                key_id=start.key_id,
                user_id=start.user_id,
            )
        )
    open_turn = state.open_turn
    if open_turn is not None:
        if cmd.holder_gone == open_turn.turn_id:
            # Its worker is gone (or no longer runs it): close it now, not at lease expiry.
            why = (503, "worker_lost", "the worker running the turn stopped before it finished")
        elif cmd.now < open_turn.lease_until:
            raise TurnInProgress(open_turn.turn_id, open_turn.lease_until, open_turn.holder)
        else:
            # Its writer hung (or left no holder to ask): close that turn so this one can start.
            why = (504, "lease_expired", "the turn did not finish before its lease expired")
        status, code, message = why
        events.append(
            TurnFailed(
                at=cmd.now, turn_id=open_turn.turn_id, status=status, code=code, message=message
            )
        )
    system, new = _split_messages(state.history, start.messages)
    if not new:
        raise NothingNew("The request adds no new message to the session.")
    unanswered = _unanswered_tool_call(state.history, new)
    if unanswered is not None:
        raise UnknownToolCall(
            f"Invalid parameter: a message with role 'tool' must answer a tool call of the "
            f"assistant message before it; no such call has the id '{unanswered[:128]}'."
        )
    events.append(
        TurnStarted(
            at=cmd.now,
            turn_id=start.turn_id,
            command_id=start.command_id,
            model=start.model,
            messages=new,
            system=system,
            params=start.params,
            metadata=start.metadata,
            lease_until=cmd.lease_until,
            streaming=start.stream,
            pipeline=cmd.pipeline,
            holder=cmd.holder,
            fingerprint=start.fingerprint,
            key_id=start.key_id,
            user_id=start.user_id,
            door=start.door,
        )
    )
    return events


def owned(state: SessionState, tenant: str, user: str | None = None) -> bool:
    """Whether the session is `tenant`'s, and `user`'s when the caller is pinned to one."""
    return (
        state.session_id is not None
        and state.tenant == tenant
        and (user is None or state.user_id == user)
    )


def _require_open(state: SessionState, turn_id: str) -> bool:
    return state.open_turn is not None and state.open_turn.turn_id == turn_id


def decide(state: SessionState, command: Command) -> list[EventUnion]:
    """The events a command produces, or a domain error that refuses it."""
    match command:
        case OpenTurn():
            return _decide_open(state, command)
        case Record(turn_id=turn_id, events=events, after_turn=after_turn):
            if after_turn:
                # A deleted session stays deleted: nothing is recorded into its place.
                return list(events) if state.session_id is not None else []
            # A turn already closed (cancelled, or taken over by another writer) takes no more.
            return list(events) if _require_open(state, turn_id) else []
        case Edit():
            return _decide_edit(state, command)
        case _:
            assert_never(command)


def item_numbers(state: SessionState) -> list[int]:
    """Each history message's item number: its position among all messages the history
    ever held, the deleted ones included (so numbers are stable and never reused)."""
    numbers: list[int] = []
    deleted = state.deleted_items
    n = d = 0
    for _ in state.history:
        while d < len(deleted) and deleted[d] == n:
            n, d = n + 1, d + 1
        numbers.append(n)
        n += 1
    return numbers


def _decide_edit(state: SessionState, command: Edit) -> list[EventUnion]:
    edit, now = command.edit, command.now
    if isinstance(edit, OpenConversation):
        if state.session_id is not None:
            raise SessionExists(f"session {edit.session_id} already exists")
        events: list[EventUnion] = [
            SessionOpened(
                at=now,
                session_id=edit.session_id,
                tenant=edit.tenant,
                key_id=edit.key_id,
                user_id=edit.user,
            )
        ]
        if edit.messages:
            events.append(ItemsAdded(at=now, messages=edit.messages))
        if edit.metadata:
            events.append(MetadataUpdated(at=now, metadata=edit.metadata))
        return events
    if not owned(state, edit.tenant, edit.user):
        raise SessionNotFound(f"No session found with id '{edit.session_id}'.")
    if isinstance(edit, UpdateMetadata):
        return [MetadataUpdated(at=now, metadata=edit.metadata)]
    if state.open_turn is not None:
        # The turn's messages join the history when it ends: items wait until then.
        turn = state.open_turn
        raise TurnInProgress(turn.turn_id, turn.lease_until, turn.holder)
    match edit:
        case AddItems():
            return [ItemsAdded(at=now, messages=edit.messages)]
        case DeleteItem():
            if edit.item not in item_numbers(state):
                raise ItemNotFound(f"No item found with id 'msg_{edit.item}'.")
            return [ItemDeleted(at=now, item=edit.item)]
        case DeleteResponse():
            if edit.turn_id not in state.turn_items:
                raise ResponseNotFound(f"No response found with turn id '{edit.turn_id}'.")
            return [ResponseDeleted(at=now, turn_id=edit.turn_id)]
        case _:
            assert_never(edit)


def session_view(session_id: str, state: SessionState, messages: bool) -> SessionView:
    """What a read of the session answers (the state must be of an open session)."""
    assert state.created_at is not None and state.updated_at is not None
    return SessionView(
        session_id=session_id,
        created_at=state.created_at,
        updated_at=state.updated_at,
        turns=state.turns,
        usage=state.usage,
        model=state.open_turn.model if state.open_turn else state.last_model,
        messages=list(state.history) if messages else None,
        metadata=state.metadata,
        item_count=len(state.history) + len(state.deleted_items),
        item_numbers=item_numbers(state) if messages else None,
    )


def _add_usage(a: Usage, b: Usage) -> Usage:
    return Usage(
        prompt_tokens=a.prompt_tokens + b.prompt_tokens,
        completion_tokens=a.completion_tokens + b.completion_tokens,
        total_tokens=a.total_tokens + b.total_tokens,
    )


# Codes of a turn that ended because a worker was lost or hung (its own, closed by
# another writer; or the model worker of its generation): nothing answered the request,
# so its Idempotency-Key may run again.
UNFINISHED = frozenset({"worker_lost", "lease_expired", "model_worker_lost"})


def ended_unanswered(outcome: TurnOutcome) -> bool:
    """A turn that ended without an answer to give again: cancelled (its client left) or
    UNFINISHED. A retry under its Idempotency-Key runs it again."""
    if outcome.status == "cancelled":
        return True
    return outcome.error is not None and outcome.error.code in UNFINISHED


def _close(
    state: SessionState, outcome: TurnOutcome, at: datetime, **changes: object
) -> SessionState:
    open_turn = state.open_turn
    if open_turn is None or open_turn.turn_id != outcome.turn_id:
        return replace(state, updated_at=at, **changes)
    outcomes = dict(state.outcomes)
    outcomes[open_turn.command_id] = replace(outcome, fingerprint=open_turn.fingerprint)
    history = changes.get("history", state.history)
    added = len(history) - len(state.history) if isinstance(history, tuple) else 0
    first = len(state.history) + len(state.deleted_items)
    turn_items = {**state.turn_items, open_turn.turn_id: (first, added)}
    return replace(
        state,
        open_turn=None,
        outcomes=outcomes,
        turn_items=turn_items,
        updated_at=at,
        turns=state.turns + 1,
        **changes,
    )


def _made_in_last_step(steps: tuple[ChatMessage, ...], calls: list[ToolCall]) -> bool:
    made = next((m for m in reversed(steps) if m.role == "assistant"), None)
    ids = {c.id for c in made.tool_calls or ()} if made else set()
    return bool(ids) and all(c.id in ids for c in calls)


def evolve(state: SessionState, event: EventUnion) -> SessionState:
    """The state after one event. Pure: it is replayed."""
    state = replace(state, events=state.events + 1)
    match event:
        case SessionOpened():
            return replace(
                state,
                session_id=event.session_id,
                tenant=event.tenant,
                key_id=event.key_id,
                user_id=event.user_id,
                created_at=event.at,
                updated_at=event.at,
            )
        case TurnStarted():
            return replace(
                state,
                open_turn=OpenTurnState(
                    turn_id=event.turn_id,
                    command_id=event.command_id,
                    model=event.model,
                    messages=tuple(event.messages),
                    lease_until=event.lease_until,
                    holder=event.holder,
                    fingerprint=event.fingerprint,
                ),
                system=event.system if event.system is not None else state.system,
                last_model=event.model,
                pipeline=event.pipeline or state.pipeline,
                updated_at=event.at,
            )
        case FactsExtracted():
            return replace(state, beyond_history=state.beyond_history + len(event.facts))
        case (
            ModelCalled()
            | MemoryRecalled()
            | DocumentsRetrieved()
            | ToolLoopStopped()
            | PromptTrimmed()
        ):
            return state
        case ToolsCalled():
            if state.open_turn is None or state.open_turn.turn_id != event.turn_id:
                return state
            answers = tuple(
                ChatMessage(
                    role="tool",
                    content=r.content if r.error is None else f"Error: {r.error}",
                    tool_call_id=r.call_id,
                )
                for r in event.results
            )
            steps = (*state.open_turn.steps, event.assistant, *answers)
            return replace(state, open_turn=replace(state.open_turn, steps=steps))
        case PipelineChosen():
            return replace(state, pipeline=event.pipeline)
        case HistorySummarized():
            return replace(
                state, summary=event.summary, summarized=event.covers, updated_at=event.at
            )
        case ReplyCompleted():
            outcome = TurnOutcome(
                turn_id=event.turn_id,
                status="completed",
                content=event.content,
                finish_reason=event.finish_reason,
                usage=event.usage,
                tool_calls=tuple(event.tool_calls),
            )
            if state.open_turn is None or state.open_turn.turn_id != event.turn_id:
                return state
            reply = ChatMessage(
                role="assistant", content=event.content, tool_calls=tuple(event.tool_calls) or None
            )
            steps = state.open_turn.steps
            if event.tool_calls and _made_in_last_step(steps, event.tool_calls):
                # Client calls made alongside server calls: that message is already in the steps.
                history = (*state.history, *state.open_turn.messages, *steps)
            else:
                history = (*state.history, *state.open_turn.messages, *steps, reply)
            return _close(
                state,
                outcome,
                event.at,
                history=history,
                usage=_add_usage(state.usage, event.usage),
            )
        case TurnFailed():
            error = ErrorInfo(
                status=event.status,
                type=error_type(event.status),
                code=event.code,
                message=event.message,
            )
            return _close(
                state,
                TurnOutcome(turn_id=event.turn_id, status="failed", error=error),
                event.at,
                beyond_history=state.beyond_history + 1,
            )
        case TurnCancelled():
            outcome = TurnOutcome(
                turn_id=event.turn_id,
                status="cancelled",
                content=event.content,
                finish_reason="cancelled",
                usage=event.usage,
            )
            return _close(
                state,
                outcome,
                event.at,
                usage=_add_usage(state.usage, event.usage),
                beyond_history=state.beyond_history + 1,
            )
        case ItemsAdded():
            return replace(state, history=(*state.history, *event.messages), updated_at=event.at)
        case ItemDeleted():
            return _delete_items(state, {event.item}, event.at)
        case MetadataUpdated():
            return replace(state, metadata=dict(event.metadata), updated_at=event.at)
        case ResponseDeleted():
            span = state.turn_items.get(event.turn_id)
            if span is None:
                return replace(state, updated_at=event.at)
            turn_items = {t: s for t, s in state.turn_items.items() if t != event.turn_id}
            state = replace(state, turn_items=turn_items)
            first, added = span
            return _delete_items(state, set(range(first, first + added)), event.at)
        case _:
            assert_never(event)


def _delete_items(state: SessionState, items: set[int], at: datetime) -> SessionState:
    """The history without the items (those still in it). Ones already folded into the
    summary leave the summary as written (it covers fewer messages)."""
    numbers = item_numbers(state)
    gone = [i for i, n in enumerate(numbers) if n in items]
    if not gone:
        return replace(state, updated_at=at)
    drop = set(gone)
    return replace(
        state,
        history=tuple(m for i, m in enumerate(state.history) if i not in drop),
        summarized=state.summarized - sum(1 for i in gone if i < state.summarized),
        deleted_items=tuple(sorted((*state.deleted_items, *(numbers[i] for i in gone)))),
        updated_at=at,
    )


SUMMARY_HEADER = "Summary of the earlier conversation (written by you for yourself):"


def _is_turn_start(history: tuple[ChatMessage, ...], i: int) -> bool:
    """A turn's messages begin at a non-assistant message after an assistant one."""
    return history[i].role != "assistant" and (i == 0 or history[i - 1].role == "assistant")


def fitting_tail(messages: Sequence[ChatMessage], budget: int, start: int = 0) -> int:
    """The first index (not before `start`) from which the messages fit `budget` tokens.

    One pass from the end that stops at the first message that does not fit, so it
    costs the kept messages, not the whole history (a session may hold many thousands).
    """
    spent = 0
    i = len(messages)
    while i > start:
        spent += message_tokens(messages[i - 1])
        if spent > budget:
            break
        i -= 1
    return i


def fold_plan(state: SessionState, budget: int) -> int | None:
    """How far to fold history into the summary so the rest fits half the budget, if it
    does not fit the budget now. Folds whole turns, and always keeps the latest turn."""
    history = state.history
    first = state.summarized
    if fitting_tail(history, budget, first) == first:
        return None
    # Whether the rest fits grows with the start: the first turn start past this index fits.
    fits_from = fitting_tail(history, budget // 2, first + 1)
    for i in range(fits_from, len(history)):
        if _is_turn_start(history, i):
            return i
    return next((i for i in range(len(history) - 1, first, -1) if _is_turn_start(history, i)), None)


def turn_query(state: SessionState) -> str:
    """What the open turn asks: its last user message (memory and knowledge search with it)."""
    if state.open_turn is None:
        return ""
    return next((m.content for m in reversed(state.open_turn.messages) if m.role == "user"), "")


def recall_may_add(state: SessionState, budget: int | None) -> bool:
    """Whether long-term memory may hold something for this turn that its prompt lacks.

    Not when memory is scoped to this session alone and the prompt carries all of
    the session: every hit would be a message already in the prompt, which recall
    leaves out anyway. Then the turn skips the recall (and its query embedding).
    """
    if state.user_id is not None or state.summarized or state.beyond_history:
        return True
    return budget is not None and fitting_tail(state.history, budget) > 0


def prompt(
    state: SessionState,
    persona: str | None = None,
    budget: int | None = None,
    memories: str | None = None,
    *,
    summary: bool = True,
) -> list[ChatMessage]:
    """What the model receives for the open turn: system, summary, recent history, new messages.

    History that still does not fit the budget (a summary failed, or is off) is
    left out of this prompt from the oldest message on; the log keeps all of it.
    `memories`: recalled memories and retrieved documents, as system text.
    """
    parts = [p for p in (persona, state.system) if p]
    if state.summary and summary:
        parts.append(f"{SUMMARY_HEADER}\n{state.summary}")
    if memories:
        parts.append(memories)
    messages: list[ChatMessage] = []
    if parts:
        messages.append(ChatMessage(role="system", content="\n\n".join(parts)))
    first = state.summarized
    if budget is not None:
        first = fitting_tail(state.history, budget, first)
    messages.extend(state.history[first:])
    if state.open_turn is not None:
        messages.extend(state.open_turn.messages)
        messages.extend(state.open_turn.steps)
    return messages
