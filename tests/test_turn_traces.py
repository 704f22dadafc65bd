"""GET /v1/sessions/{id}/turns: what happened behind the curtain, per turn, from the log."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import pytest

from actors.turn_trace import turn_traces
from config import (
    ApiKey,
    Config,
    EngineConfig,
    FallbackConfig,
    MemoryConfig,
    ModelConfig,
    PipelineConfig,
    RoutingRules,
)
from eventstore.events import (
    ChatMessage,
    DocumentsRetrieved,
    EventUnion,
    MemoryRecalled,
    ModelCall,
    ModelCalled,
    PipelineChosen,
    RecalledMemory,
    ReplyCompleted,
    ResponseDeleted,
    RetrievedChunk,
    TurnCancelled,
    TurnFailed,
    TurnStarted,
    Usage,
)
from testkit.upstreams import FakeOpenAI, ToolCalls
from tests.harness import VeilThread
from tests.test_gateway import http

KEY = "sk-traces-a"
ADMIN = "sk-traces-admin"
AUDIT = "sk-traces-audit"
OTHER = "sk-traces-b"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answer(body: dict[str, Any]) -> str | ToolCalls:
    if any(m["role"] == "tool" for m in body["messages"]):
        return "It is 391."
    if "python" in str(body["messages"][-1]["content"]):
        return ToolCalls([("calculator", {"expression": "17 * 23"})])
    return "plain answer"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply=answer) as fake:
        yield fake


@pytest.fixture(scope="module")
def dead_port() -> int:
    return closed_port()


@pytest.fixture(scope="module")
def veil(nats_url: str, upstream: FakeOpenAI, dead_port: int) -> Iterator[VeilThread]:
    config = Config(
        keys=[
            ApiKey(key=KEY, tenant="a"),
            ApiKey(key=ADMIN, tenant="a", admin=True),
            ApiKey(key=AUDIT, tenant="a", scopes=["audit"]),
            ApiKey(key=OTHER, tenant="b"),
        ],
        engines={
            "up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x"),
            "down": EngineConfig(
                kind="openai", base_url=f"http://127.0.0.1:{dead_port}/v1", api_key="x"
            ),
        },
        pipelines={
            "general": PipelineConfig(engine="up", model="m"),
            # The code pipeline's engine is away: its turns fall back to `up`, and use a tool.
            "code": PipelineConfig(
                engine="down",
                model="m",
                retries=0,
                fallbacks=[FallbackConfig(engine="up", model="m")],
                tools=["calculator"],
                routing=RoutingRules(keywords=["python"]),
            ),
        },
        models=[ModelConfig(name="assistant", pipelines=["general", "code"])],
        memory=MemoryConfig(enabled=False),
        nats_url=nats_url,
    )
    with VeilThread(config, nats_url) as server:
        yield server


def ask(veil: VeilThread, text: str, sid: str | None = None) -> str:
    with openai.OpenAI(base_url=veil.base_url, api_key=KEY, max_retries=0) as client:
        reply = client.chat.completions.create(
            model="assistant",
            messages=[{"role": "user", "content": text}],
            extra_body={"session_id": sid} if sid else None,
        )
    return str(reply.model_extra["session_id"])


def get(veil: VeilThread, path: str, key: str = KEY) -> tuple[int, dict[str, Any]]:
    reply = http("GET", f"{veil.base_url}{path}", headers={"Authorization": f"Bearer {key}"})
    return reply.status_code, reply.json()


@pytest.fixture(scope="module")
def session(veil: VeilThread) -> str:
    sid = ask(veil, "hello there")
    ask(veil, "what is 17 * 23 in python?", sid)
    ask(veil, "thanks", sid)
    return sid


def test_each_turn_shows_its_pipeline_tools_and_model_calls(
    veil: VeilThread, session: str, dead_port: int
) -> None:
    status, body = get(veil, f"/sessions/{session}/turns")
    assert status == 200 and body["object"] == "list" and body["has_more"] is False
    first, second, third = body["data"]
    assert [t["object"] for t in body["data"]] == ["session.turn"] * 3
    assert body["first_id"] == first["id"] and body["last_id"] == third["id"]
    assert first["status"] == "completed" and first["model"] == "assistant"
    assert first["pipeline"]["name"] == "general"
    assert second["pipeline"]["name"] == "code" and second["pipeline"]["means"] == "rule:keyword"
    # The code pipeline's engine is away: each step fails there, then falls back.
    calls = second["model_calls"]
    assert [c["engine"] for c in calls] == ["down", "up", "down", "up"]
    assert calls[0]["error"] == "failed", "a chat key sees that a call failed, not why"
    assert str(dead_port) not in str(body)
    assert [c.get("error") for c in calls] == ["failed", None, "failed", None]
    assert second["tools"][0]["step"] == 1
    tool = second["tools"][0]["results"][0]
    assert tool["name"] == "calculator" and tool["content"] == "391"
    assert second["finish_reason"] == "stop" and second["usage"]["total_tokens"] > 0
    assert third["started_at"] >= second["started_at"] >= first["started_at"]
    assert third["ended_at"] >= third["started_at"]


def test_admins_see_what_failed_and_auditors_read_their_tenant(
    veil: VeilThread, session: str, dead_port: int
) -> None:
    status, body = get(veil, f"/sessions/{session}/turns", key=ADMIN)
    assert status == 200
    failed = body["data"][1]["model_calls"][0]
    assert f"127.0.0.1:{dead_port}" in failed["error"], failed
    status, body = get(veil, f"/sessions/{session}/turns", key=AUDIT)
    assert status == 200 and len(body["data"]) == 3
    assert body["data"][1]["model_calls"][0]["error"] == "failed"


def test_one_turn_by_id_and_pages(veil: VeilThread, session: str) -> None:
    _, listing = get(veil, f"/sessions/{session}/turns")
    ids = [t["id"] for t in listing["data"]]
    status, one = get(veil, f"/sessions/{session}/turns/{ids[1]}")
    assert status == 200 and one == listing["data"][1]
    status, page = get(veil, f"/sessions/{session}/turns?limit=1")
    assert status == 200 and [t["id"] for t in page["data"]] == ids[:1] and page["has_more"]
    status, page = get(veil, f"/sessions/{session}/turns?limit=1&after={ids[0]}")
    assert [t["id"] for t in page["data"]] == ids[1:2] and page["has_more"]
    status, page = get(veil, f"/sessions/{session}/turns?after={ids[1]}")
    assert [t["id"] for t in page["data"]] == ids[2:] and not page["has_more"]


def test_another_tenant_finds_nothing(veil: VeilThread, session: str) -> None:
    _, listing = get(veil, f"/sessions/{session}/turns")
    turn_id = listing["data"][0]["id"]
    for path in (f"/sessions/{session}/turns", f"/sessions/{session}/turns/{turn_id}"):
        status, body = get(veil, path, key=OTHER)
        assert status == 404 and body["error"]["code"] == "session_not_found", body
        assert "hello" not in str(body)


@pytest.mark.parametrize(
    ("query", "param"),
    [("limit=0", "limit"), ("limit=101", "limit"), ("limit=x", "limit"), ("after=a%20b", "after")],
)
def test_bad_listing_parameters_are_400s(
    veil: VeilThread, session: str, query: str, param: str
) -> None:
    status, body = get(veil, f"/sessions/{session}/turns?{query}")
    assert status == 400 and body["error"]["param"] == param


def test_unknown_turns_and_cursors(veil: VeilThread, session: str) -> None:
    status, body = get(veil, f"/sessions/{session}/turns/turn_nope")
    assert status == 404 and body["error"]["code"] == "turn_not_found"
    status, body = get(veil, f"/sessions/{session}/turns/{'x' * 5000}")
    assert status == 404 and len(str(body)) < 1000
    status, body = get(veil, f"/sessions/{session}/turns?after=turn_nope")
    assert status == 400 and body["error"]["code"] == "invalid_cursor"
    status, body = get(veil, "/sessions/sess_nope/turns")
    assert status == 404 and body["error"]["code"] == "session_not_found"


# The fold itself, from plain events.

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def started(turn_id: str, second: float, pipeline: str | None = None) -> TurnStarted:
    return TurnStarted(
        at=at(second),
        turn_id=turn_id,
        command_id=turn_id,
        model="assistant",
        messages=[ChatMessage(role="user", content="q")],
        lease_until=at(second + 60),
        pipeline=pipeline,
    )


def test_the_fold_keeps_recall_retrieval_and_every_ending() -> None:
    hit = RecalledMemory(
        id="m1", session_id="s0", source_seq=3, kind="fact", role="user", score=0.8, used=True
    )
    chunk = RetrievedChunk(
        id="c1",
        collection="docs",
        path="a.md",
        sha256="0" * 64,
        chunk=0,
        offset=0,
        score=0.7,
        similarity=0.6,
    )
    failed_call = ModelCall(engine="e", upstream_model="m", latency_ms=5, error="x:1 refused")
    events: list[EventUnion] = [
        started("t1", 0, pipeline="only-one"),
        MemoryRecalled(at=at(1), turn_id="t1", query="q", hits=[hit]),
        DocumentsRetrieved(at=at(1), turn_id="t1", collections=["docs"], query="q", chunks=[chunk]),
        ModelCalled(at=at(2), turn_id="t1", call=failed_call),
        ReplyCompleted(
            at=at(3), turn_id="t1", content="a", finish_reason="stop", usage=Usage(), call=None
        ),
        started("t2", 4),
        PipelineChosen(at=at(4), turn_id="t2", pipeline="p", means="semantic", scores={"p": 0.9}),
        TurnFailed(at=at(5), turn_id="t2", status=502, code="upstream_error", message="m"),
        started("t3", 6),
        TurnCancelled(at=at(7), turn_id="t3", content="par", usage=Usage(completion_tokens=2)),
        started("t4", 8),
        # An event of no known turn changes nothing.
        ModelCalled(at=at(9), turn_id="elsewhere", call=failed_call),
    ]
    one, two, three, four = turn_traces(events)
    assert one.pipeline is not None and one.pipeline.means == "only"
    assert one.memory[0].hits == [hit] and one.retrieval[0].chunks == [chunk]
    assert one.model_calls[0].error == "failed" and one.status == "completed"
    assert turn_traces(events, details=True)[0].model_calls[0].error == "x:1 refused"
    assert two.pipeline is not None and two.pipeline.scores == {"p": 0.9}
    assert (two.status, two.error_status, two.error_code) == ("failed", 502, "upstream_error")
    assert three.status == "cancelled" and three.usage.completion_tokens == 2
    assert four.status == "running" and four.ended_at is None and four.model_calls == []


def test_a_turn_deleted_as_a_response_is_read_back_as_if_it_never_ran() -> None:
    reply = ReplyCompleted(
        at=at(1), turn_id="t1", content="a", finish_reason="stop", usage=Usage(), call=None
    )
    events: list[EventUnion] = [
        started("t1", 0),
        reply,
        started("t2", 2),
        ResponseDeleted(at=at(3), turn_id="t1"),
        # Its events after the deletion (a late fact extraction) bring no trace back.
        ModelCalled(
            at=at(4), turn_id="t1", call=ModelCall(engine="e", upstream_model="m", latency_ms=1)
        ),
    ]
    assert [t.turn_id for t in turn_traces(events, content=True)] == ["t2"]
