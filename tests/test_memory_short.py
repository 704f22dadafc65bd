"""Short-term memory: history within a token budget, folded into a running summary."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from actors.session import SUMMARY_HEADER
from actors.summary import INSTRUCTIONS
from actors.tokens import estimate_message_tokens
from config import Config, EngineConfig, MemoryConfig, ModelConfig, PipelineConfig
from eventstore.events import ChatMessage, HistorySummarized, ModelCalled
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread

BUDGET = 120


def reply(body: dict[str, Any]) -> str:
    if body["messages"][0]["content"] == INSTRUCTIONS:
        return "- the user said words " + str(len(body["messages"][1]["content"]))
    return "ok " + "noted " * 10


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply=reply) as fake:
        yield fake


@pytest.fixture(scope="module")
def veil(nats_url: str, upstream: FakeOpenAI) -> Iterator[VeilThread]:
    config = Config(
        engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
        pipelines={
            "default": PipelineConfig(
                engine="up", model="m", system_prompt="Persona.", history_budget=BUDGET
            )
        },
        models=[ModelConfig(name="veil", pipeline="default")],
        nats_url=nats_url,
        memory=MemoryConfig(enabled=False),  # long-term memory has its own tests
    )
    with VeilThread(config, nats_url) as server:
        yield server


def chat_turns(veil: VeilThread, n: int) -> str:
    sid = None
    with openai.OpenAI(base_url=veil.base_url, api_key="x", max_retries=0) as client:
        for i in range(n):
            r = client.chat.completions.create(
                model="veil",
                messages=[{"role": "user", "content": f"turn {i}: " + "blah " * 12}],
                extra_body={"session_id": sid} if sid else None,
            )
            sid = r.model_extra["session_id"]
    assert sid is not None
    return sid


def reply_prompts(upstream: FakeOpenAI) -> list[list[dict[str, str]]]:
    return [
        r.body["messages"]
        for r in upstream.requests
        if r.body["messages"][0]["content"] != INSTRUCTIONS
    ]


def test_history_is_folded_into_a_summary_and_prompts_stay_in_budget(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    upstream.reset()
    sid = chat_turns(veil, 12)
    events = veil.events(sid)
    summaries = [e for e in events if isinstance(e, HistorySummarized)]
    assert summaries, "a summary was written"
    assert [e.call.purpose for e in events if isinstance(e, ModelCalled)].count("summary") == len(
        summaries
    )
    for messages in reply_prompts(upstream):
        history = [ChatMessage(role=m["role"], content=m["content"]) for m in messages[1:-1]]
        assert estimate_message_tokens(history) <= BUDGET
    last = reply_prompts(upstream)[-1]
    assert SUMMARY_HEADER in last[0]["content"] and summaries[-1].summary in last[0]["content"]
    assert last[-1]["content"].startswith("turn 11:")
    # The summary covers what the prompt leaves out: the first turn is not in the prompt any more.
    assert all(not m["content"].startswith("turn 0:") for m in last)


def test_failed_summary_loses_no_turn(veil: VeilThread, upstream: FakeOpenAI) -> None:
    from actors import session

    upstream.reset()
    sid = None
    armed = False
    with openai.OpenAI(base_url=veil.base_url, api_key="x", max_retries=0) as client:
        for i in range(6):
            if (
                sid
                and not armed
                and session.fold_plan(session.fold(veil.events(sid)), BUDGET) is not None
            ):
                upstream.fail_next(500, message="summary down")  # the next call is the summary
                armed = True
            r = client.chat.completions.create(
                model="veil",
                messages=[{"role": "user", "content": f"turn {i}: " + "blah " * 12}],
                extra_body={"session_id": sid} if sid else None,
            )
            sid = r.model_extra["session_id"]
    assert armed
    events = veil.events(sid)
    failed = [
        e
        for e in events
        if isinstance(e, ModelCalled) and e.call.purpose == "summary" and e.call.error
    ]
    assert len(failed) == 1 and "summary down" in (failed[0].call.error or "")
    # Every turn's messages are still in the conversation the log rebuilds.
    state = session.fold(events)
    assert [m.content.split(":")[0] for m in state.history if m.role == "user"] == [
        f"turn {i}" for i in range(6)
    ]
    for messages in reply_prompts(upstream):
        history = [ChatMessage(role=m["role"], content=m["content"]) for m in messages[1:-1]]
        assert estimate_message_tokens(history) <= BUDGET
