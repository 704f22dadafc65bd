"""A turn's workflow, branch by branch: given the session's events, when an effect
returns this, then these events are recorded and this effect runs next.

Pure: no bus, no event loop. The state moves on as the shell moves it, by
appending each step's events through `session.decide`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from actors import session, tokens, turn
from config import (
    Config,
    EngineConfig,
    FallbackConfig,
    MemoryPolicy,
    ModelConfig,
    PipelineConfig,
)
from contracts.errors import ErrorInfo
from contracts.knowledge import KnowledgeHit
from contracts.memory import MemoryHit
from contracts.model import GenerateResult
from contracts.router import RouteDecision
from contracts.session import StartTurn, TurnDone, TurnError
from eventstore.events import (
    ChatMessage,
    DocumentsRetrieved,
    EventUnion,
    FactsExtracted,
    FunctionCall,
    HistorySummarized,
    MemoryRecalled,
    ModelCalled,
    PipelineChosen,
    PromptTrimmed,
    ReplyCompleted,
    ToolCall,
    ToolLoopStopped,
    ToolResult,
    ToolsCalled,
    TurnCancelled,
    TurnFailed,
    Usage,
)
from eventstore.knowledge import Position

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def pipeline(**overrides: Any) -> PipelineConfig:
    return PipelineConfig(**{"engine": "up", "model": "m", **overrides})


def setup(
    *,
    pipelines: dict[str, PipelineConfig] | None = None,
    model: ModelConfig | None = None,
    stream: bool = False,
    text: str = "hello",
    memory: bool = True,
    user: str | None = None,
) -> turn.TurnSetup:
    start = StartTurn(
        command_id="c1",
        turn_id="t1",
        session_id="s1",
        new_session=True,
        tenant="acme",
        key_id="k",
        model="veil",
        messages=[ChatMessage(role="user", content=text)],
        stream=stream,
        user_id=user,
    )
    return turn.TurnSetup(
        start=start,
        model=model or ModelConfig(name="veil", pipeline="p"),
        pipelines=pipelines or {"p": pipeline()},
        tool_schemas={"calculator": {"type": "function", "function": {"name": "calculator"}}},
        memory_enabled=memory,
    )


def opened(setup: turn.TurnSetup, history: int = 0) -> session.SessionState:
    """A session with `history` completed turns, and this turn open."""
    start = setup.start
    state = session.initial()
    for i in range(history):
        earlier = StartTurn(
            **{
                **{f: getattr(start, f) for f in start.__struct_fields__},
                "command_id": f"old{i}",
                "turn_id": f"old{i}",
                "new_session": i == 0,
                "messages": [ChatMessage(role="user", content=f"question {i} " + "word " * 40)],
            }
        )
        state = _apply(state, session.OpenTurn(start=earlier, now=T0, lease_until=T0))
        answer = ok(f"answer {i} " + "word " * 40)
        state = _apply(
            state, session.Record(turn_id=f"old{i}", events=(_reply(f"old{i}", answer),))
        )
    if history:
        start = StartTurn(
            **{**{f: getattr(start, f) for f in start.__struct_fields__}, "new_session": False}
        )
    lease = T0 + timedelta(minutes=5)
    pipeline_name = turn.only_pipeline(setup.model)
    return _apply(
        state, session.OpenTurn(start=start, now=T0, lease_until=lease, pipeline=pipeline_name)
    )


def _reply(turn_id: str, result: GenerateResult) -> ReplyCompleted:
    return turn.reply_completed(turn_id, result, T0)


def _apply(state: session.SessionState, command: session.Command) -> session.SessionState:
    return session.fold(session.decide(state, command), state)


def recorded(state: session.SessionState, step: turn.Step) -> session.SessionState:
    """The state once the shell appended the step's events."""
    events = tuple(step.events)
    return _apply(state, session.Record(turn_id="t1", events=events)) if events else state


def ok(content: str = "fine", **fields: Any) -> GenerateResult:
    usage = Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7)
    return GenerateResult(
        **{"engine": "up", "upstream_model": "m", "content": content, "usage": usage, **fields}
    )


def failed(status: int, *, retryable: bool = True, **fields: Any) -> GenerateResult:
    error = ErrorInfo(
        status=status, type="api_error", code="upstream", message=f"{status}", retryable=retryable
    )
    return GenerateResult(
        engine=fields.pop("engine", "up"), upstream_model="m", error=error, **fields
    )


def call(name: str, call_id: str) -> ToolCall:
    return ToolCall(id=call_id, function=FunctionCall(name=name, arguments="{}"))


def types(events: list[EventUnion]) -> list[type]:
    return [type(e) for e in events]


class Run:
    """Drives the workflow the way the shell does."""

    def __init__(self, setup: turn.TurnSetup, history: int = 0) -> None:
        self.state = opened(setup, history)
        self.step = turn.begin(self.state, setup, T0)

    @property
    def effect(self) -> turn.Effect | None:
        return self.step.effect

    def then(self, seen: turn.Observation, *, cancelled: bool = False) -> turn.Step:
        self.state = recorded(self.state, self.step)
        self.step = turn.advance(self.state, self.step.progress, seen, T0, cancelled)
        return self.step


def test_one_pipeline_asks_its_model_and_completes() -> None:
    run = Run(setup())
    assert isinstance(run.effect, turn.CallModel) and run.step.events == []
    assert run.effect.link == FallbackConfig(engine="up", model="m")
    assert run.effect.job.messages[-1] == ChatMessage(role="user", content="hello")
    done = run.then(turn.ModelAnswered(result=ok("hi there")))
    assert types(done.events) == [ReplyCompleted] and done.effect is None
    reply = done.events[0]
    assert isinstance(reply, ReplyCompleted) and reply.call is not None
    assert reply.call.engine == "up" and reply.call.usage == ok().usage
    assert isinstance(done.reply, TurnDone) and done.reply.content == "hi there"
    assert done.after is None


def test_a_stream_publishes_to_its_output_subject() -> None:
    run = Run(setup(stream=True))
    assert isinstance(run.effect, turn.CallModel)
    assert run.effect.job.out_subject is not None and "s1" in run.effect.job.out_subject


def test_several_pipelines_ask_the_router_and_record_its_choice() -> None:
    pipelines = {"a": pipeline(), "b": pipeline(engine="other", model="big")}
    model = ModelConfig(name="veil", pipelines=["a", "b"])
    run = Run(setup(pipelines=pipelines, model=model))
    assert isinstance(run.effect, turn.AskRouter) and run.effect.request.text == "hello"
    decision = RouteDecision(pipeline="b", means="keyword", detail="big")
    step = run.then(turn.Routed(decision=decision))
    assert types(step.events) == [PipelineChosen]
    assert isinstance(step.effect, turn.CallModel) and step.effect.link.engine == "other"


def test_without_a_router_the_default_pipeline_answers() -> None:
    pipelines = {"a": pipeline(), "b": pipeline(engine="other")}
    run = Run(setup(pipelines=pipelines, model=ModelConfig(name="veil", pipelines=["a", "b"])))
    step = run.then(turn.Routed(failure="NoRespondersError()"))
    chosen = step.events[0]
    assert isinstance(chosen, PipelineChosen) and (chosen.pipeline, chosen.means) == (
        "a",
        "default",
    )
    assert "router unavailable" in (chosen.detail or "")


def test_retries_with_backoff_then_falls_back_then_answers() -> None:
    chain = pipeline(
        retries=1, retry_backoff=0.5, fallbacks=[FallbackConfig(engine="b", model="mb")]
    )
    run = Run(setup(pipelines={"p": chain}))
    step = run.then(turn.ModelAnswered(result=failed(503)))
    assert types(step.events) == [ModelCalled] and step.effect == turn.Pause(seconds=0.5)
    step = run.then(turn.Paused())
    assert isinstance(step.effect, turn.CallModel) and step.effect.link.engine == "up"
    assert step.events == []
    # The link's retries are spent: the next link, without a pause.
    step = run.then(turn.ModelAnswered(result=failed(503)))
    assert types(step.events) == [ModelCalled]
    assert isinstance(step.effect, turn.CallModel) and step.effect.link.engine == "b"
    assert step.effect.job.upstream_model == "mb"
    step = run.then(turn.ModelAnswered(result=ok("from b", engine="b")))
    assert types(step.events) == [ReplyCompleted] and isinstance(step.reply, TurnDone)


def test_retry_after_is_honoured_up_to_the_longest_wait() -> None:
    run = Run(setup(pipelines={"p": pipeline(retries=2, max_retry_wait=3.0)}))
    asked = failed(429)
    slow = GenerateResult(
        engine="up",
        upstream_model="m",
        error=ErrorInfo(
            status=429,
            type="rate_limit_error",
            code="rate",
            message="slow down",
            retryable=True,
            retry_after=30.0,
        ),
    )
    assert run.then(turn.ModelAnswered(result=slow)).effect == turn.Pause(seconds=3.0)
    run.then(turn.Paused())
    assert run.then(turn.ModelAnswered(result=asked)).effect == turn.Pause(seconds=1.0)


@pytest.mark.parametrize(
    "result",
    [
        failed(400, retryable=False),  # the request is wrong: another try will not help
        failed(503, deltas=3),  # the stream reached the client: never restarted
    ],
)
def test_some_failures_end_the_turn_at_once(result: GenerateResult) -> None:
    run = Run(setup(pipelines={"p": pipeline(fallbacks=[FallbackConfig(engine="b", model="x")])}))
    step = run.then(turn.ModelAnswered(result=result))
    assert types(step.events) == [ModelCalled, TurnFailed] and step.effect is None
    assert isinstance(step.reply, TurnError) and step.reply.error == result.error
    assert step.reply.deltas == result.deltas


def test_the_last_failure_of_the_chain_fails_the_turn() -> None:
    run = Run(setup(pipelines={"p": pipeline(retries=0)}))
    step = run.then(turn.ModelAnswered(result=failed(502)))
    assert types(step.events) == [ModelCalled, TurnFailed]
    assert isinstance(step.reply, TurnError) and step.reply.error.status == 502


def test_server_tools_run_and_their_answers_go_back_to_the_model() -> None:
    run = Run(setup(pipelines={"p": pipeline(tools=["calculator"])}))
    assert isinstance(run.effect, turn.CallModel)
    assert run.effect.job.hidden_tools == ["calculator"]
    assert run.effect.job.params["tools"][0]["function"]["name"] == "calculator"
    asks = ok("", tool_calls=[call("calculator", "c1")], finish_reason="tool_calls")
    step = run.then(turn.ModelAnswered(result=asks))
    assert step.events == [] and isinstance(step.effect, turn.RunTools)
    assert [c.id for c in step.effect.calls] == ["c1"]
    assert step.effect.context["tenant"] == "acme" and step.effect.context["session_id"] == "s1"
    answer = ToolResult(call_id="c1", name="calculator", arguments="{}", content="42")
    step = run.then(turn.ToolsRan(results=[answer]))
    assert types(step.events) == [ModelCalled, ToolsCalled]
    assert isinstance(step.effect, turn.CallModel)
    assert step.effect.job.messages[-1] == ChatMessage(role="tool", content="42", tool_call_id="c1")
    step = run.then(turn.ModelAnswered(result=ok("it is 42")))
    assert types(step.events) == [ReplyCompleted]


def test_the_tool_loop_stops_at_its_limit_and_asks_for_an_answer_without_tools() -> None:
    run = Run(setup(pipelines={"p": pipeline(tools=["calculator"], max_tool_steps=1)}))
    asks = ok("", tool_calls=[call("calculator", "c1")], finish_reason="tool_calls")
    run.then(turn.ModelAnswered(result=asks))
    answer = ToolResult(call_id="c1", name="calculator", arguments="{}", content="1")
    run.then(turn.ToolsRan(results=[answer]))
    again = ok("", tool_calls=[call("calculator", "c2")], finish_reason="tool_calls")
    step = run.then(turn.ModelAnswered(result=again))
    assert types(step.events) == [ToolLoopStopped, ModelCalled]
    stopped = step.events[0]
    assert isinstance(stopped, ToolLoopStopped) and stopped.steps == 1
    assert isinstance(step.effect, turn.CallModel)
    assert step.effect.job.params["tool_choice"] == "none" and step.effect.job.hidden_tools == []
    step = run.then(turn.ModelAnswered(result=ok("done")))
    assert types(step.events) == [ReplyCompleted]


def test_mixed_calls_run_the_servers_and_hand_the_clients_back() -> None:
    run = Run(setup(pipelines={"p": pipeline(tools=["calculator"])}))
    both = [call("calculator", "s1"), call("get_weather", "k1")]
    step = run.then(turn.ModelAnswered(result=ok("", tool_calls=both, finish_reason="tool_calls")))
    assert isinstance(step.effect, turn.RunTools) and [c.id for c in step.effect.calls] == ["s1"]
    answer = ToolResult(call_id="s1", name="calculator", arguments="{}", content="3")
    step = run.then(turn.ToolsRan(results=[answer]))
    assert types(step.events) == [ModelCalled, ToolsCalled, ReplyCompleted]
    assert step.effect is None and isinstance(step.reply, TurnDone)
    assert step.reply.finish_reason == "tool_calls"
    assert [c.id for c in step.reply.tool_calls] == ["k1"]
    # The session goes on from the assistant message with both calls, answered in part.
    state = recorded(run.state, step)
    assert state.open_turn is None and state.history[-2].tool_calls == tuple(both)


def test_a_long_history_is_folded_first_and_a_failed_summary_changes_nothing() -> None:
    small = pipeline(context_window=400)
    run = Run(setup(pipelines={"p": small}, memory=False), history=6)
    assert isinstance(run.effect, turn.CallModel) and run.effect.purpose == "summary"
    assert run.effect.job.params == turn.SUMMARY_PARAMS
    step = run.then(turn.ModelAnswered(result=failed(502, retryable=False)))
    # The history that still does not fit is left out of this prompt, and that is recorded.
    assert types(step.events) == [ModelCalled, PromptTrimmed]
    trimmed = step.events[1]
    assert isinstance(trimmed, PromptTrimmed) and trimmed.history_left_out > 0
    called = step.events[0]
    assert isinstance(called, ModelCalled) and called.call.purpose == "summary"
    assert isinstance(step.effect, turn.CallModel) and step.effect.purpose == "reply"
    state = recorded(run.state, step)
    assert state.summary is None and len(state.history) == 12


def test_a_summary_replaces_the_turns_it_covers() -> None:
    run = Run(setup(pipelines={"p": pipeline(context_window=400)}, memory=False), history=6)
    step = run.then(turn.ModelAnswered(result=ok("- the user asked six questions")))
    assert types(step.events) == [ModelCalled, HistorySummarized]
    assert isinstance(step.effect, turn.CallModel)
    system = step.effect.job.messages[0]
    assert system.role == "system" and "six questions" in system.content


def test_a_client_that_leaves_cancels_the_call_and_keeps_what_it_produced() -> None:
    run = Run(setup())
    partial = ok("hal", cancelled=True)
    step = run.then(turn.ModelAnswered(result=partial))
    assert types(step.events) == [ModelCalled, TurnCancelled] and step.effect is None
    cancelled = step.events[1]
    assert isinstance(cancelled, TurnCancelled) and cancelled.content == "hal"
    # A request always gets its answer; a stream has nobody left to read it.
    assert isinstance(step.reply, TurnError) and step.reply.error.status == 499
    stream = Run(setup(stream=True))
    assert stream.then(turn.ModelAnswered(result=partial)).reply is None


def test_a_client_that_leaves_during_a_pause_stops_the_retries() -> None:
    run = Run(setup(pipelines={"p": pipeline(retries=3)}))
    run.then(turn.ModelAnswered(result=failed(503)))
    step = run.then(turn.Paused(), cancelled=True)
    assert types(step.events) == [TurnCancelled] and step.effect is None


def test_a_client_that_leaves_during_the_tools_keeps_the_tool_step() -> None:
    run = Run(setup(pipelines={"p": pipeline(tools=["calculator"])}))
    asks = ok("", tool_calls=[call("calculator", "c1")], finish_reason="tool_calls")
    run.then(turn.ModelAnswered(result=asks))
    answer = ToolResult(call_id="c1", name="calculator", arguments="{}", content="1")
    step = run.then(turn.ToolsRan(results=[answer]), cancelled=True)
    assert types(step.events) == [ModelCalled, ToolsCalled, TurnCancelled]


def _memory(text: str, similarity: float, session_id: str = "s0") -> MemoryHit:
    return MemoryHit(
        id=text,
        session_id=session_id,
        user_id=None,
        kind="message",
        role="user",
        text=text,
        source_seq=1,
        created_at=T0,
        score=0.5,
        vector_similarity=similarity,
    )


def test_recall_puts_relevant_memories_in_the_prompt_and_records_every_hit() -> None:
    # Memory scoped to a user may hold what this session's prompt lacks.
    run = Run(setup(user="ann"), history=1)
    assert isinstance(run.effect, turn.Recall) and run.effect.request.query == "hello"
    hits = [_memory("Ann likes tea", 0.8), _memory("unrelated", 0.01)]
    step = run.then(turn.Recalled(hits=hits))
    recalled = step.events[0]
    assert isinstance(recalled, MemoryRecalled)
    assert [(h.id, h.used) for h in recalled.hits] == [
        ("Ann likes tea", True),
        ("unrelated", False),
    ]
    # Another session's text stays out of this session's log.
    assert recalled.hits[0].text is None
    assert isinstance(step.effect, turn.CallModel)
    assert "Ann likes tea" in step.effect.job.messages[0].content


def test_recall_that_fails_is_recorded_and_no_memory_actor_is_memory_off() -> None:
    run = Run(setup(user="ann"))
    step = run.then(turn.Recalled(failure="TimeoutError()"))
    assert types(step.events) == [MemoryRecalled] and isinstance(step.effect, turn.CallModel)
    absent = Run(setup(user="ann"))
    assert absent.then(turn.Recalled(absent=True)).events == []
    assert isinstance(Run(setup(user="ann", memory=False)).effect, turn.CallModel)
    # A session whose whole history is in the prompt has nothing to recall.
    assert isinstance(Run(setup(), history=1).effect, turn.CallModel)


def test_retrieval_puts_documents_in_the_prompt() -> None:
    run = Run(setup(pipelines={"p": pipeline(knowledge=["docs"])}, memory=False))
    assert isinstance(run.effect, turn.Retrieve) and run.effect.request.collections == ["docs"]
    hit = KnowledgeHit(
        collection="docs",
        path="guide.md",
        sha256="ab" * 32,
        chunk=0,
        heading=("Setup",),
        position=Position(offset=0),
        text="Run veil serve.",
        score=0.9,
        similarity=0.9,
    )
    step = run.then(turn.Retrieved(hits=[hit]))
    assert types(step.events) == [DocumentsRetrieved]
    assert isinstance(step.effect, turn.CallModel)
    assert "Run veil serve." in step.effect.job.messages[0].content
    failed_search = Run(setup(pipelines={"p": pipeline(knowledge=["docs"])}, memory=False))
    step = failed_search.then(turn.Retrieved(failure="TimeoutError()"))
    retrieved = step.events[0]
    assert isinstance(retrieved, DocumentsRetrieved) and retrieved.error == "TimeoutError()"


def test_facts_are_extracted_after_the_reply_not_before() -> None:
    run = Run(setup(pipelines={"p": pipeline(memory=MemoryPolicy(extract_facts=True))}))
    step = run.then(turn.ModelAnswered(result=ok("Nice to meet you, Ann")))
    assert isinstance(step.reply, TurnDone)
    assert isinstance(step.after, turn.CallModel) and step.after.purpose == "facts"
    assert "Nice to meet you, Ann" in step.after.job.messages[-1].content
    events = turn.facts_recorded("t1", ok("- The user's name is Ann\nNONE"), T0)
    assert types(events) == [ModelCalled, FactsExtracted]
    facts = events[1]
    assert isinstance(facts, FactsExtracted) and facts.facts == ["The user's name is Ann"]
    assert types(turn.facts_recorded("t1", failed(502), T0)) == [ModelCalled]


def test_facts_are_not_recorded_into_a_deleted_session() -> None:
    events = tuple(turn.facts_recorded("t1", ok("- The user is Ann"), T0))
    record = session.Record(turn_id="t1", events=events, after_turn=True)
    assert session.decide(session.initial(), record) == []


def test_admission_refuses_unknown_models_and_unsupported_parameters() -> None:
    config = Config(
        engines={"up": EngineConfig(kind="anthropic", base_url="http://127.0.0.1:9")},
        pipelines={"p": pipeline()},
        models=[ModelConfig(name="veil", pipeline="p")],
    )
    start = setup().start
    assert turn.admit(config, start) is None
    unknown = turn.admit(config, StartTurn(**{**_fields(start), "model": "nope"}))
    assert unknown is not None and unknown.status == 404
    refused = turn.admit(config, StartTurn(**{**_fields(start), "params": {"seed": 7}}))
    assert refused is not None and (refused.status, refused.param) == (400, "seed")


def _fields(start: StartTurn) -> dict[str, Any]:
    return {f: getattr(start, f) for f in start.__struct_fields__}


def test_a_failed_call_that_produced_nothing_records_no_tokens() -> None:
    assert turn.model_call(failed(502)).usage is None
    estimated = ok("partial", usage_estimated=True)
    call = turn.model_call(estimated)
    assert call.usage == estimated.usage and call.usage_estimated


def _document(text: str) -> KnowledgeHit:
    return KnowledgeHit(
        collection="docs",
        path="guide.md",
        sha256="cd" * 32,
        chunk=0,
        heading=(),
        position=Position(offset=0),
        text=text,
        score=0.9,
        similarity=0.9,
    )


@pytest.mark.parametrize(
    ("window", "dropped"),
    [
        (4000, []),
        (900, ["memories"]),
        (500, ["memories", "documents"]),
    ],
)
def test_every_part_of_the_prompt_fits_one_window_and_memories_give_way_first(
    window: int, dropped: list[str]
) -> None:
    # About 400 tokens of memories and of documents; the reply keeps a quarter of the window.
    policy = MemoryPolicy(budget=2000, inject=5)
    config = pipeline(context_window=window, knowledge=["docs"], memory=policy)
    run = Run(setup(pipelines={"p": config}, user="ann"))
    memories = [_memory(f"memory {i} " + "tea " * 70, 0.9) for i in range(5)]
    run.then(turn.Recalled(hits=memories))
    step = run.then(turn.Retrieved(hits=[_document("doc " * 400)]))
    assert isinstance(step.effect, turn.CallModel)
    prompt = step.effect.job.messages
    trimmed = [e for e in step.events if isinstance(e, PromptTrimmed)]
    if not dropped:
        assert trimmed == []
        return
    assert [t.dropped for t in trimmed] == [dropped]
    assert trimmed[0].prompt_tokens <= window - window // 4
    assert sum(tokens.message_tokens(m) for m in prompt) <= window - window // 4
    assert prompt[-1] == ChatMessage(role="user", content="hello")  # the turn always goes in


def test_the_reply_keeps_what_the_request_asks_for() -> None:
    assert turn.reply_reserve({"max_tokens": 300}, 1000) == 300
    assert turn.reply_reserve({"max_completion_tokens": 50, "max_tokens": 300}, 1000) == 50
    assert turn.reply_reserve({}, 1000) == 250
