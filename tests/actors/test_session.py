"""The session's pure logic: given events, when a command, then events (no event loop)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from actors import session, tokens, turn
from actors.errors import (
    AlreadyHandled,
    IdempotencyMismatch,
    NothingNew,
    SessionExists,
    SessionNotFound,
    TurnInProgress,
    UnknownToolCall,
)
from contracts.errors import ErrorInfo
from contracts.model import GenerateResult
from contracts.session import StartTurn
from eventstore.events import (
    ChatMessage,
    EventUnion,
    FactsExtracted,
    FunctionCall,
    HistorySummarized,
    ModelCalled,
    SessionOpened,
    ToolCall,
    TurnCancelled,
    TurnFailed,
    TurnStarted,
    Usage,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LEASE = timedelta(minutes=10)


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def start(turn: str, *messages: ChatMessage, new: bool = False, tenant: str = "t1") -> StartTurn:
    return StartTurn(
        command_id=f"cmd-{turn}",
        turn_id=turn,
        session_id="s1",
        new_session=new,
        tenant=tenant,
        key_id="k1",
        model="veil",
        messages=list(messages),
    )


def open_turn(cmd: StartTurn, now: datetime = T0) -> session.OpenTurn:
    return session.OpenTurn(start=cmd, now=now, lease_until=now + LEASE)


def result(text: str) -> GenerateResult:
    return GenerateResult(
        engine="up",
        upstream_model="m",
        content=text,
        usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
    )


def complete(turn_id: str, reply: GenerateResult) -> session.Record:
    return session.Record(turn_id=turn_id, events=(turn.reply_completed(turn_id, reply, T0),))


def given(*events: EventUnion) -> session.SessionState:
    return session.fold(list(events))


def run(
    state: session.SessionState, command: session.Command
) -> tuple[session.SessionState, list[EventUnion]]:
    events = session.decide(state, command)
    return session.fold(events, state), events


def completed_session() -> session.SessionState:
    state, _ = run(session.initial(), open_turn(start("t1", user("hi"), new=True)))
    state, _ = run(state, complete("t1", result("hello")))
    return state


def test_new_session_opens_and_starts_a_turn() -> None:
    events = session.decide(session.initial(), open_turn(start("t1", user("hi"), new=True)))
    assert [type(e) for e in events] == [SessionOpened, TurnStarted]
    assert events[1].messages == [user("hi")]


def test_a_name_the_client_chose_opens_a_session_on_first_use() -> None:
    named = msgspec.structs.replace(start("t1", user("hi")), user_id="ann", user_bound=True)
    state, events = run(session.initial(), open_turn(named))
    assert [type(e) for e in events] == [SessionOpened, TurnStarted]
    assert events[0] == SessionOpened(
        at=T0, session_id="s1", tenant="t1", key_id="k1", user_id="ann"
    )
    # Its next turn continues it.
    state, _ = run(state, complete("t1", result("hello")))
    _, events = run(state, open_turn(msgspec.structs.replace(named, command_id="c2", turn_id="t2")))
    assert [type(e) for e in events] == [TurnStarted]


def test_another_users_session_is_not_found_by_a_key_pinned_to_a_user() -> None:
    ann = msgspec.structs.replace(start("t1", user("hi")), user_id="ann", user_bound=True)
    state, _ = run(session.initial(), open_turn(ann))
    state, _ = run(state, complete("t1", result("hello")))
    bob = msgspec.structs.replace(start("t2", user("x")), user_id="bob", user_bound=True)
    with pytest.raises(SessionNotFound):
        session.decide(state, open_turn(bob))


def test_other_tenant_is_not_found() -> None:
    with pytest.raises(SessionNotFound):
        session.decide(completed_session(), open_turn(start("t2", user("x"), tenant="t2")))


def test_new_session_id_taken() -> None:
    with pytest.raises(SessionExists):
        session.decide(completed_session(), open_turn(start("t2", user("x"), new=True)))


def test_completion_appends_to_history_and_prompt() -> None:
    state = completed_session()
    assert state.history == (user("hi"), ChatMessage(role="assistant", content="hello"))
    assert state.turns == 1 and state.usage.total_tokens == 5
    state, _ = run(
        state, open_turn(start("t2", ChatMessage(role="system", content="terse"), user("again")))
    )
    assert session.prompt(state, "persona") == [
        ChatMessage(role="system", content="persona\n\nterse"),
        user("hi"),
        ChatMessage(role="assistant", content="hello"),
        user("again"),
    ]


def test_resent_history_prefix_is_stripped() -> None:
    state = completed_session()
    _, events = run(
        state,
        open_turn(
            start("t2", user("hi"), ChatMessage(role="assistant", content="hello"), user("new"))
        ),
    )
    assert events[0].messages == [user("new")]


def test_nothing_new_is_refused() -> None:
    with pytest.raises(NothingNew):
        session.decide(
            session.initial(),
            open_turn(start("t1", ChatMessage(role="system", content="x"), new=True)),
        )


def test_retried_command_is_already_handled_with_its_outcome() -> None:
    state = completed_session()
    with pytest.raises(AlreadyHandled) as info:
        session.decide(state, open_turn(start("t1", user("hi"))))
    assert info.value.outcome is not None and info.value.outcome.content == "hello"


def test_retry_while_running_is_already_handled_without_outcome() -> None:
    state, _ = run(session.initial(), open_turn(start("t1", user("hi"), new=True)))
    with pytest.raises(AlreadyHandled) as info:
        session.decide(state, open_turn(start("t1", user("hi"))))
    assert info.value.outcome is None


def test_second_turn_waits_while_the_lease_holds() -> None:
    state, _ = run(session.initial(), open_turn(start("t1", user("hi"), new=True)))
    with pytest.raises(TurnInProgress):
        session.decide(state, open_turn(start("t2", user("x")), now=T0 + timedelta(minutes=1)))


def test_expired_lease_fails_the_old_turn_first() -> None:
    state, _ = run(session.initial(), open_turn(start("t1", user("hi"), new=True)))
    state, events = run(
        state, open_turn(start("t2", user("x")), now=T0 + LEASE + timedelta(seconds=1))
    )
    assert [type(e) for e in events] == [TurnFailed, TurnStarted]
    assert events[0].turn_id == "t1" and events[0].code == "lease_expired"
    assert state.open_turn is not None and state.open_turn.turn_id == "t2"
    assert state.history == ()  # the abandoned turn never entered the conversation


def test_a_lease_names_its_holder_and_a_gone_holder_frees_the_session_at_once() -> None:
    first = session.OpenTurn(
        start=start("t1", user("hi"), new=True), now=T0, lease_until=T0 + LEASE, holder="w-1"
    )
    state, events = run(session.initial(), first)
    assert events[1].holder == "w-1"
    soon = T0 + timedelta(seconds=5)
    with pytest.raises(TurnInProgress) as busy:
        session.decide(state, open_turn(start("t2", user("x")), now=soon))
    assert busy.value.holder == "w-1"
    # The holder answered that it no longer runs t1: no waiting for the lease.
    retry = session.OpenTurn(
        start=start("t2", user("x")),
        now=soon,
        lease_until=soon + LEASE,
        holder="w-2",
        holder_gone="t1",
    )
    state, events = run(state, retry)
    assert [type(e) for e in events] == [TurnFailed, TurnStarted]
    assert events[0].turn_id == "t1" and events[0].code == "worker_lost"
    assert state.open_turn is not None and state.open_turn.holder == "w-2"
    # Naming another turn as gone frees nothing.
    stale = session.OpenTurn(
        start=start("t3", user("y")), now=soon, lease_until=soon + LEASE, holder_gone="t1"
    )
    with pytest.raises(TurnInProgress):
        session.decide(state, stale)


def test_a_retry_of_a_turn_whose_worker_is_gone_runs_it_again() -> None:
    first = session.OpenTurn(
        start=start("t1", user("hi"), new=True), now=T0, lease_until=T0 + LEASE, holder="w-1"
    )
    state, _ = run(session.initial(), first)
    soon = T0 + timedelta(seconds=5)
    retry = start("t1", user("hi"))  # the same command (same Idempotency-Key): t1 again
    with pytest.raises(AlreadyHandled) as waiting:
        session.decide(state, open_turn(retry, now=soon))
    assert waiting.value.outcome is None  # still running as far as the log says
    # Its holder is gone: the retry closes that turn and starts it again.
    again = session.OpenTurn(
        start=retry, now=soon, lease_until=soon + LEASE, holder="w-2", holder_gone="t1"
    )
    state, events = run(state, again)
    assert [type(e) for e in events] == [TurnFailed, TurnStarted]
    assert events[0].code == "worker_lost" and events[1].turn_id == "t1"
    assert state.open_turn is not None and state.open_turn.holder == "w-2"
    state, _ = run(state, complete("t1", result("hello")))
    with pytest.raises(AlreadyHandled) as done:
        session.decide(state, open_turn(retry, now=soon))
    assert done.value.outcome is not None and done.value.outcome.status == "completed"


def test_a_turn_closed_because_its_worker_was_lost_leaves_its_key_free() -> None:
    first = session.OpenTurn(
        start=start("t1", user("hi"), new=True), now=T0, lease_until=T0 + LEASE, holder="w-1"
    )
    state, _ = run(session.initial(), first)
    soon = T0 + timedelta(seconds=5)
    # Another request finds t1's worker gone and closes it.
    other = session.OpenTurn(
        start=start("t2", user("x")), now=soon, lease_until=soon + LEASE, holder_gone="t1"
    )
    state, _ = run(state, other)
    state, _ = run(state, complete("t2", result("ok")))
    # The same request again runs (nothing answered it: no 503 to replay), a first turn
    # that opened its session too.
    for again in (start("t1", user("hi")), start("t1", user("hi"), new=True)):
        assert [type(e) for e in session.decide(state, open_turn(again, now=soon))] == [TurnStarted]
    state, _ = run(state, open_turn(start("t1", user("hi")), now=soon))
    # A turn that failed on its own (the upstream's error) is replayed, not run again.
    state, _ = run(
        state,
        session.Record(
            turn_id="t1",
            events=(
                TurnFailed(at=soon, turn_id="t1", status=502, code="upstream_error", message="x"),
            ),
        ),
    )
    with pytest.raises(AlreadyHandled) as replayed:
        session.decide(state, open_turn(start("t1", user("hi")), now=soon))
    assert replayed.value.outcome is not None and replayed.value.outcome.status == "failed"


def test_a_turn_cancelled_because_its_client_left_runs_again_on_retry() -> None:
    state, _ = run(session.initial(), open_turn(start("t1", user("hi"), new=True)))
    state, _ = run(
        state,
        session.Record(
            turn_id="t1",
            events=(TurnCancelled(at=T0, turn_id="t1", content="partial", usage=Usage()),),
        ),
    )
    # The client that left got no answer: its retry runs the turn, not a replayed 499.
    events = session.decide(state, open_turn(start("t1", user("hi"), new=True)))
    assert [type(e) for e in events] == [TurnStarted]


def test_a_retry_must_be_the_same_request() -> None:
    first = msgspec.structs.replace(start("t1", user("hi"), new=True), fingerprint="f1")
    state, _ = run(session.initial(), open_turn(first))
    with pytest.raises(IdempotencyMismatch):  # while it runs
        session.decide(state, open_turn(msgspec.structs.replace(first, fingerprint="f2")))
    state, _ = run(state, complete("t1", result("hello")))
    with pytest.raises(IdempotencyMismatch) as refused:  # and after it ended
        session.decide(state, open_turn(msgspec.structs.replace(first, fingerprint="f2")))
    assert refused.value.status == 422
    with pytest.raises(AlreadyHandled):
        session.decide(state, open_turn(first))
    # Logs and gateways from before fingerprints: no check.
    with pytest.raises(AlreadyHandled):
        session.decide(state, open_turn(msgspec.structs.replace(first, fingerprint=None)))


def _calls(*ids: str) -> ChatMessage:
    calls = tuple(ToolCall(id=i, function=FunctionCall(name="f", arguments="{}")) for i in ids)
    return ChatMessage(role="assistant", content="", tool_calls=calls)


def _answer(call_id: str) -> ChatMessage:
    return ChatMessage(role="tool", content="42", tool_call_id=call_id)


def test_a_tool_answer_must_follow_its_call() -> None:
    state, _ = run(session.initial(), open_turn(start("t1", user("hi"), new=True)))
    reply = GenerateResult(
        engine="up",
        upstream_model="m",
        finish_reason="tool_calls",
        tool_calls=list(_calls("c1", "c2").tool_calls or ()),
    )
    state, _ = run(state, complete("t1", reply))
    # Answers to the calls the session's last reply made, in any order.
    session.decide(state, open_turn(start("t2", _answer("c2"), _answer("c1"))))
    for bad in (
        (_answer("nope"),),
        (_answer("c1"), user("x"), _answer("c2")),  # a user message in between
    ):
        with pytest.raises(UnknownToolCall) as refused:
            session.decide(state, open_turn(start("t2", *bad)))
        assert refused.value.status == 400 and refused.value.param == "messages"
    # A conversation sent whole carries its own calls.
    fresh = start("t1", user("hi"), _calls("a"), _answer("a"), _calls("b"), _answer("b"), new=True)
    session.decide(session.initial(), open_turn(fresh))
    with pytest.raises(UnknownToolCall):
        session.decide(
            session.initial(), open_turn(start("t1", user("hi"), _answer("a"), new=True))
        )


def test_failed_turn_is_recorded_but_not_remembered() -> None:
    state, _ = run(session.initial(), open_turn(start("t1", user("hi"), new=True)))
    error = ErrorInfo(status=502, type="api_error", code="upstream_error", message="down")
    failed = GenerateResult(engine="up", upstream_model="m", error=error)
    recorded = (
        turn.model_called("t1", failed, T0),
        TurnFailed(at=T0, turn_id="t1", status=502, code="upstream_error", message="down"),
    )
    state, events = run(state, session.Record(turn_id="t1", events=recorded))
    assert [type(e) for e in events] == [ModelCalled, TurnFailed]
    assert state.open_turn is None and state.history == ()
    assert state.outcomes["cmd-t1"].status == "failed"


def test_cancel_keeps_what_was_produced() -> None:
    state, _ = run(session.initial(), open_turn(start("t1", user("hi"), new=True)))
    partial = GenerateResult(
        engine="up",
        upstream_model="m",
        content="hal",
        usage=Usage(completion_tokens=1, total_tokens=1),
        cancelled=True,
    )
    cancelled = TurnCancelled(at=T0, turn_id="t1", content=partial.content, usage=partial.usage)
    state, events = run(state, session.Record(turn_id="t1", events=(cancelled,)))
    assert events == [cancelled]
    assert state.open_turn is None and state.outcomes["cmd-t1"].status == "cancelled"


def test_closing_a_turn_that_is_not_open_adds_nothing() -> None:
    state = completed_session()
    assert session.decide(state, complete("t1", result("again"))) == []
    cancelled = TurnCancelled(at=T0, turn_id="zz", content="", usage=Usage())
    assert session.decide(state, session.Record(turn_id="zz", events=(cancelled,))) == []


def test_evolve_is_a_pure_replay() -> None:
    state = completed_session()
    events: list[EventUnion] = [
        SessionOpened(at=T0, session_id="s1", tenant="t1", key_id="k1"),
        TurnStarted(
            at=T0,
            turn_id="t1",
            command_id="cmd-t1",
            model="veil",
            messages=[user("hi")],
            lease_until=T0 + LEASE,
        ),
        turn.model_called("t1", result("retried"), T0),
        turn.reply_completed("t1", result("hello"), T0),
    ]
    assert given(*events) == given(*events)
    assert given(*events).history == state.history


def long_session(turns: int, words: int = 20) -> session.SessionState:
    state, _ = run(session.initial(), open_turn(start("t0", user("w " * words), new=True)))
    state, _ = run(state, complete("t0", result("r " * words)))
    for i in range(1, turns):
        state, _ = run(state, open_turn(start(f"t{i}", user("w " * words))))
        state, _ = run(state, complete(f"t{i}", result("r " * words)))
    return state


def test_no_fold_while_history_fits() -> None:
    assert session.fold_plan(long_session(3), budget=10_000) is None


def test_fold_plan_keeps_whole_recent_turns_within_half_the_budget() -> None:
    state = long_session(10)  # each message ~14 tokens with overhead
    covers = session.fold_plan(state, budget=100)
    assert covers is not None and covers % 2 == 0 and state.history[covers].role == "user"
    from actors.tokens import estimate_message_tokens

    assert estimate_message_tokens(state.history[covers:]) <= 50


def test_summary_replaces_folded_turns_in_the_prompt() -> None:
    state = long_session(10)
    state, _ = run(state, open_turn(start("t10", user("latest"))))
    covers = session.fold_plan(state, budget=100)
    assert covers is not None
    summarized = HistorySummarized(at=T0, turn_id="t10", summary="Ann likes tea.", covers=covers)
    state, _ = run(state, session.Record(turn_id="t10", events=(summarized,)))
    messages = session.prompt(state, "persona", budget=100)
    assert messages[0].role == "system" and "Ann likes tea." in messages[0].content
    assert messages[1:] == [*state.history[covers:], user("latest")]
    assert len(state.history) == 20  # nothing is lost from the state


def test_prompt_drops_oldest_history_when_no_summary_fits() -> None:
    from actors.tokens import estimate_message_tokens

    state = long_session(10)
    state, _ = run(state, open_turn(start("t10", user("latest"))))
    messages = session.prompt(state, None, budget=60)
    assert messages[-1] == user("latest")
    assert estimate_message_tokens(messages[:-1]) <= 60
    assert messages[-2] == state.history[-1]


def test_parse_facts_drops_bullets_and_none() -> None:
    from actors.summary import MAX_FACTS, parse_facts

    assert parse_facts("- The user likes tea.\n* NONE\n\n2. The user's son is Tom.") == [
        "The user likes tea.",
        "The user's son is Tom.",
    ]
    assert parse_facts("NONE") == []
    assert len(parse_facts("\n".join(f"- fact {i}" for i in range(20)))) == MAX_FACTS


# --- when long-term recall can add anything ---------------------------------------------------


def test_recall_is_skipped_only_while_the_prompt_carries_the_whole_session() -> None:
    state = completed_session()
    assert session.recall_may_add(state, budget=1000) is False
    assert session.recall_may_add(state, budget=None) is False
    # The history no longer fits: older messages are only in long-term memory.
    assert session.recall_may_add(state, budget=1) is True
    # A user's other sessions may hold something.
    assert session.recall_may_add(msgspec.structs.replace(state, user_id="u1"), budget=1000) is True
    # Folded into a summary: the exact messages are gone from the prompt.
    assert session.recall_may_add(msgspec.structs.replace(state, summarized=2), budget=1000) is True


def test_failed_and_cancelled_turns_and_facts_keep_recall_on() -> None:
    base = completed_session()
    cmd = start("t2", user("my locker is 31-07"))
    for closing in (
        TurnFailed(at=T0, turn_id="t2", status=502, code="upstream_error", message="boom"),
        TurnCancelled(at=T0, turn_id="t2", content="", usage=Usage()),
    ):
        state, _ = run(base, open_turn(cmd))
        state = session.evolve(state, closing)
        # Its message is remembered (TurnStarted is indexed) but never enters the history.
        assert user("my locker is 31-07") not in state.history
        assert session.recall_may_add(state, budget=1000) is True
    facts = session.evolve(base, FactsExtracted(at=T0, turn_id="t1", facts=["likes tea"]))
    assert session.recall_may_add(facts, budget=1000) is True


# --- trimming a long history costs one pass ------------------------------------------------


def test_trimming_a_long_history_estimates_each_message_at_most_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first turn of thousands of tiny messages, then a follow-up: the prompt, the fold
    plan and the recall check each read the history once from the end (counted, not timed:
    one estimate per message dropped made this quadratic, 46 s at 10,000 messages)."""
    n = 4000
    tiny = [
        user(f"m{i}") if i % 2 == 0 else ChatMessage(role="assistant", content="ok")
        for i in range(n)
    ]
    state, _ = run(session.initial(), open_turn(start("t0", *tiny, new=True)))
    state, _ = run(state, complete("t0", result("done")))
    state, _ = run(state, open_turn(start("t1", user("and now?"))))
    assert len(state.history) == n + 1
    estimates = 0
    real = tokens.estimate_tokens

    def counted(text: str) -> int:
        nonlocal estimates
        estimates += 1
        return real(text)

    monkeypatch.setattr(tokens, "estimate_tokens", counted)
    for budget in (50, 5_000, 100_000):
        estimates = 0
        messages = session.prompt(state, "persona", budget=budget)
        assert estimates <= len(state.history) + 1
        assert messages[-1] == user("and now?")
        estimates = 0
        session.fold_plan(state, budget)
        assert estimates <= 2 * (len(state.history) + 1)
        estimates = 0
        session.recall_may_add(state, budget)
        assert estimates <= len(state.history) + 1
    # Small budgets keep only the tail and never read the rest.
    estimates = 0
    kept = session.prompt(state, None, budget=50)
    assert estimates < 20 and len(kept) < 15


def test_fitting_tail_matches_dropping_one_message_at_a_time() -> None:
    from actors.tokens import estimate_message_tokens

    history = tuple(user("x" * (i % 13)) for i in range(200))
    for budget in (0, 5, 37, 400, 10_000):
        for start_at in (0, 3, 150, 200):
            expected = start_at
            while expected < len(history) and estimate_message_tokens(history[expected:]) > budget:
                expected += 1
            assert session.fitting_tail(history, budget, start_at) == expected
