"""A data directory written before sessions were per tenant still works after the upgrade.

The previous version kept a session's events under `chat.events.<session id>` and its
tombstone under `chat.tombstones.<session id>`. Here such a directory is written the old
way (raw publishes to the old subjects, as that version did), the nats-server is
restarted on it, and today's Veil runs on it: the old session continues through the
HTTP API where it is, its memories and usage are projected, `veil replay` and `veil
sessions` find it, a deletion recorded the old way still holds, and another tenant
using the same id gets a session of its own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import nats
import openai
import pytest

from bus.requests import nats_request
from bus.subjects import EVENTS_STREAM, USAGE_QUERY, legacy_session_events
from config import (
    ApiKey,
    Config,
    EngineConfig,
    MemoryConfig,
    ModelConfig,
    PipelineConfig,
    key_id,
)
from contracts.usage import USAGE_QUERY_CODEC, USAGE_REPORT_CODEC, UsageQuery
from eventstore.events import (
    ChatMessage,
    EventUnion,
    ModelCall,
    ReplyCompleted,
    SessionOpened,
    TurnStarted,
    Usage,
)
from eventstore.jetstream import ensure_stream
from eventstore.tombstones import Tombstone, TombstoneLog
from eventstore.upcast import EVENT_CODEC
from testkit.procs import run_veil
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread
from tests.test_gateway import http
from veil.natsserver import NatsServer

KEY_A, KEY_B = "sk-upgrade-a", "sk-upgrade-b"
OLD = "sess_0ld5e55100"  # a session id the previous version drew
DELETED = "sess_0ldde1e7ed"  # one deleted under the previous version
MARKER = f"lockercode{uuid.uuid4().hex[:8]}"
# The day the old turn ran: the usage ledger has a row of its own for it.
T0 = datetime(2025, 6, 1, 12, tzinfo=UTC)


def _old_session() -> list[EventUnion]:
    said = f"My locker code is {MARKER}."
    return [
        SessionOpened(at=T0, session_id=OLD, tenant="a", key_id=key_id(KEY_A), user_id="ann"),
        TurnStarted(
            at=T0,
            turn_id="t_old",
            command_id="t_old",
            model="veil",
            messages=[ChatMessage(role="user", content=said)],
            lease_until=T0 + timedelta(minutes=10),
            key_id=key_id(KEY_A),
            user_id="ann",
        ),
        ReplyCompleted(
            at=T0,
            turn_id="t_old",
            content="Noted.",
            finish_reason="stop",
            usage=Usage(prompt_tokens=7, completion_tokens=2, total_tokens=9),
            call=ModelCall(
                engine="up",
                upstream_model="m",
                latency_ms=3.0,
                usage=Usage(prompt_tokens=7, completion_tokens=2, total_tokens=9),
            ),
        ),
    ]


async def _write_the_old_way(url: str) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        await TombstoneLog(js, nc).ensure()
        for event in _old_session():
            # The old subject: the session id alone.
            await js.publish(f"chat.events.{OLD}", EVENT_CODEC.encode(event), stream=EVENTS_STREAM)
        gone = Tombstone(session_id=DELETED, tenant="a", deleted_by=key_id(KEY_A), at=T0)
        await js.publish(f"chat.tombstones.{DELETED}", msgspec.json.encode(gone))
        await nc.flush()
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def old_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JetStream directory as the previous version left it."""
    store = tmp_path_factory.mktemp("old-veil-nats")
    with NatsServer(store) as server:
        asyncio.run(_write_the_old_way(server.url))
    return store


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def veil(old_data: Path, upstream: FakeOpenAI) -> Iterator[VeilThread]:
    with NatsServer(old_data) as server:
        config = Config(
            keys=[ApiKey(key=KEY_A, tenant="a"), ApiKey(key=KEY_B, tenant="b")],
            engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
            pipelines={"default": PipelineConfig(engine="up", model="m")},
            models=[ModelConfig(name="veil", pipeline="default")],
            memory=MemoryConfig(enabled=True),
            nats_url=server.url,
        )
        with VeilThread(config, server.url) as running:
            yield running


def chat(veil: VeilThread, key: str, text: str, sid: str | None, user: str = "ann") -> Any:
    with openai.OpenAI(base_url=veil.base_url, api_key=key, max_retries=0) as client:
        return client.chat.completions.create(
            model="veil",
            messages=[{"role": "user", "content": text}],
            extra_body={"session_id": sid} if sid else None,
            user=user,
        )


def call(veil: VeilThread, method: str, path: str, key: str) -> tuple[int, Any]:
    reply = http(method, f"{veil.base_url}{path}", headers={"Authorization": f"Bearer {key}"})
    return reply.status_code, reply.json()


def sent(upstream: FakeOpenAI) -> str:
    return str(upstream.last_request.body["messages"])


def test_an_old_session_continues_where_it_is(veil: VeilThread, upstream: FakeOpenAI) -> None:
    status, view = call(veil, "GET", f"/sessions/{OLD}", KEY_A)
    assert status == 200 and view["turns"] == 1
    reply = chat(veil, KEY_A, "What is my locker code?", OLD)
    assert reply.model_extra["session_id"] == OLD
    assert MARKER in sent(upstream), "the old history reaches the model"
    status, listed = call(veil, "GET", f"/sessions/{OLD}/messages", KEY_A)
    assert [m["role"] for m in listed["data"]] == ["user", "assistant"] * 2
    status, turns = call(veil, "GET", f"/sessions/{OLD}/turns", KEY_A)
    assert [t["id"] for t in turns["data"]] == ["t_old", reply.id.removeprefix("chatcmpl-")]
    # Appended under the old subject: the stream's sequences never moved.
    events = veil.events(OLD, "a")
    assert isinstance(events[0], SessionOpened) and events[0].tenant == "a"
    assert [e.turn_id for e in events if isinstance(e, TurnStarted)] == ["t_old", reply.id[9:]]

    async def subjects() -> dict[str, int]:
        nc = await nats.connect(veil.nats_url)
        try:
            info = await nc.jetstream().stream_info(EVENTS_STREAM, subjects_filter="chat.events.>")
            return dict(info.state.subjects or {})
        finally:
            await nc.close()

    found = veil.call(subjects())
    assert found[legacy_session_events(OLD)] == len(events) and f"chat.events.a.{OLD}" not in found


def test_old_memories_and_usage_are_projected(veil: VeilThread, upstream: FakeOpenAI) -> None:
    veil.wait_for_memory()
    status, found = call(veil, "GET", f"/sessions/{OLD}/memories?q=locker", KEY_A)
    assert status == 200 and MARKER in str(found)
    # Ann's other sessions recall it too (the user's scope, within tenant a).
    chat(veil, KEY_A, "Remind me of my locker code.", None)
    assert MARKER in sent(upstream)

    async def applied() -> None:
        nc = veil.workers.nc
        last = (await nc.jetstream().stream_info(EVENTS_STREAM)).state.last_seq
        ask = USAGE_QUERY_CODEC.encode(UsageQuery(limit=1))
        while (
            USAGE_REPORT_CODEC.decode(
                (await nats_request(nc, USAGE_QUERY, ask, timeout=5)).data
            ).applied_seq
            < last
        ):
            await asyncio.sleep(0.02)

    veil.call(applied())
    # The old turn is billed to tenant a, its key and its day, with the tokens it recorded.
    status, report = call(
        veil, "GET", "/usage?group_by=tenant&from=2025-06-01&to=2025-06-01", KEY_A
    )
    rows = [r for b in report["data"] for r in b["results"]]
    assert status == 200, report
    assert [(r["project_id"], r["num_model_requests"], r["input_tokens"]) for r in rows] == [
        ("a", 1, 7)
    ]


def test_replay_and_sessions_find_the_old_session(veil: VeilThread) -> None:
    env = {"VEIL_NATS_URL": veil.nats_url}
    replay = run_veil("replay", OLD, env=env)
    assert replay.returncode == 0, replay.stderr
    assert MARKER in replay.stdout and "session opened by tenant a" in replay.stdout
    listed = run_veil("sessions", "--tenant", "a", env=env)
    assert any(line.split()[:2] == [OLD, "a"] for line in listed.stdout.splitlines())


def test_another_tenant_using_the_old_id_gets_its_own_session(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    assert call(veil, "GET", f"/sessions/{OLD}", KEY_B)[0] == 404
    reply = chat(veil, KEY_B, "What is my locker code?", OLD)
    assert reply.model_extra["session_id"] == OLD and MARKER not in sent(upstream)
    status, theirs = call(veil, "GET", f"/sessions/{OLD}/messages", KEY_B)
    assert status == 200 and len(theirs["data"]) == 2 and MARKER not in str(theirs)
    status, found = call(veil, "GET", f"/sessions/{OLD}/memories?q=locker", KEY_B)
    assert status == 200 and MARKER not in str(found)


def test_an_old_deletion_still_holds_for_its_tenant(veil: VeilThread) -> None:
    with pytest.raises(openai.NotFoundError):
        chat(veil, KEY_A, "Is it back?", DELETED)
    assert call(veil, "GET", f"/sessions/{DELETED}", KEY_A)[0] == 404
    # For another tenant it is a free name.
    assert chat(veil, KEY_B, "Mine now.", DELETED).model_extra["session_id"] == DELETED


def test_deleting_the_old_session_erases_it_and_leaves_the_other_tenants(
    veil: VeilThread,
) -> None:
    chat(veil, KEY_B, "b's own words", OLD)  # b's session of that id (opened above, or now)
    assert call(veil, "DELETE", f"/sessions/{OLD}", KEY_A)[0] == 200
    assert call(veil, "GET", f"/sessions/{OLD}", KEY_A)[0] == 404
    assert veil.events(OLD, "a") == []
    with pytest.raises(openai.NotFoundError):
        chat(veil, KEY_A, "Still there?", OLD)
    status, theirs = call(veil, "GET", f"/sessions/{OLD}", KEY_B)
    assert status == 200 and theirs["turns"] >= 1
