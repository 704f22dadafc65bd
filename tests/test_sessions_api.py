"""The sessions API: metadata, messages, and forgetting a session everywhere."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from config import ApiKey, Config, EngineConfig, MemoryConfig, ModelConfig, PipelineConfig
from eventstore.events import SessionOpened
from eventstore.jetstream import JetStreamEventStore
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread
from tests.test_gateway import http
from veil.natsserver import NatsServer

KEY_A = "sk-sessions-a"
KEY_B = "sk-sessions-b"
# Two keys of tenant a, each pinned to one end user.
KEY_ANN = "sk-sessions-a-ann"
KEY_BOB = "sk-sessions-a-bob"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def veil(nats_url: str, upstream: FakeOpenAI) -> Iterator[VeilThread]:
    config = Config(
        keys=[
            ApiKey(key=KEY_A, tenant="a"),
            ApiKey(key=KEY_B, tenant="b"),
            ApiKey(key=KEY_ANN, tenant="a", user="ann"),
            ApiKey(key=KEY_BOB, tenant="a", user="bob"),
        ],
        engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
        pipelines={"default": PipelineConfig(engine="up", model="m")},
        models=[ModelConfig(name="veil", pipeline="default")],
        nats_url=nats_url,
        memory=MemoryConfig(enabled=False),  # long-term memory: tests/test_memory_long.py
    )
    with VeilThread(config, nats_url) as server:
        yield server


def api(
    veil: VeilThread, method: str, path: str, key: str = KEY_A
) -> tuple[int, dict[str, object]]:
    reply = http(method, f"{veil.base_url}{path}", headers={"Authorization": f"Bearer {key}"})
    return reply.status_code, reply.json()


def chat(
    veil: VeilThread,
    text: str,
    session_id: str | None = None,
    *,
    key: str = KEY_A,
    user: str | None = None,
) -> str:
    with openai.OpenAI(base_url=veil.base_url, api_key=key, max_retries=0) as client:
        reply = client.chat.completions.create(
            model="veil",
            messages=[{"role": "user", "content": text}],
            extra_body={"session_id": session_id} if session_id else None,
            **({"user": user} if user else {}),
        )
    return str(reply.model_extra["session_id"])


def test_session_metadata_and_messages(veil: VeilThread) -> None:
    sid = chat(veil, "first")
    chat(veil, "second", sid)
    status, body = api(veil, "GET", f"/sessions/{sid}")
    assert status == 200
    assert (
        body["id"] == sid
        and body["object"] == "session"
        and body["turns"] == 2
        and body["model"] == "veil"
    )
    assert body["created_at"] <= body["updated_at"]
    status, messages = api(veil, "GET", f"/sessions/{sid}/messages")
    assert status == 200 and messages["object"] == "list"
    assert [(m["role"], m["content"]) for m in messages["data"]] == [
        ("user", "first"),
        ("assistant", "echo: first"),
        ("user", "second"),
        ("assistant", "echo: second"),
    ]


@pytest.mark.parametrize("path", ["", "/messages"])
def test_other_tenants_and_unknown_ids_get_the_same_404(veil: VeilThread, path: str) -> None:
    sid = chat(veil, "private")
    foreign = api(veil, "GET", f"/sessions/{sid}{path}", key=KEY_B)
    missing = api(veil, "GET", f"/sessions/sess_missing{path}", key=KEY_B)
    assert foreign[0] == missing[0] == 404
    assert foreign[1]["error"]["code"] == missing[1]["error"]["code"] == "session_not_found"
    assert api(veil, "DELETE", f"/sessions/{sid}", key=KEY_B)[0] == 404
    assert api(veil, "GET", f"/sessions/bad.id{path}")[0] == 404
    assert api(veil, "GET", f"/sessions/{sid}{path}")[0] == 200  # untouched by the attempts


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_delete_forgets_everywhere_and_leaves_a_tombstone(
    veil: VeilThread, nats_server: NatsServer, upstream: FakeOpenAI
) -> None:
    marker = f"zebra-{uuid.uuid4().hex}"
    sid = chat(veil, f"my secret is {marker}")
    chat(veil, "and more", sid)
    assert _files_containing(nats_server.store_dir, marker.encode()), (
        "the text is in the log before"
    )
    status, body = api(veil, "DELETE", f"/sessions/{sid}")
    assert status == 200 and body == {"id": sid, "object": "session.deleted", "deleted": True}
    assert api(veil, "GET", f"/sessions/{sid}")[0] == 404
    assert api(veil, "DELETE", f"/sessions/{sid}")[0] == 404
    with pytest.raises(openai.NotFoundError):
        chat(veil, "still there?", sid)
    # Erased, not just hidden: the bytes are gone from the JetStream store.
    deadline = time.monotonic() + 5
    while _files_containing(nats_server.store_dir, marker.encode()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _files_containing(nats_server.store_dir, marker.encode()) == []

    async def tombstone() -> object:
        import nats

        from eventstore.tombstones import TombstoneLog

        nc = await nats.connect(veil.nats_url)
        try:
            js = nc.jetstream()
            found = await TombstoneLog(js, nc).get("a", sid)
            events = await JetStreamEventStore(js, nc).load("a", sid)
            return found, events
        finally:
            await nc.close()

    found, events = veil.call(tombstone())
    assert events == []
    assert found is not None and found.tenant == "a" and found.deleted_by.startswith("key_")
    assert marker not in json.dumps(str(found))


def test_a_deleted_session_never_reopens_under_the_key_that_opened_it(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    key = uuid.uuid4().hex
    with openai.OpenAI(base_url=veil.base_url, api_key=KEY_A, max_retries=0) as client:
        ask = {
            "model": "veil",
            "messages": [{"role": "user", "content": "open"}],
            "extra_headers": {"Idempotency-Key": key},
        }
        sid = client.chat.completions.create(**ask).model_extra["session_id"]
        assert api(veil, "DELETE", f"/sessions/{sid}")[0] == 200
        calls = len(upstream.requests)
        with pytest.raises(openai.ConflictError) as refused:
            client.chat.completions.create(**ask)
    assert refused.value.body["code"] == "session_deleted"
    assert len(upstream.requests) == calls
    assert api(veil, "GET", f"/sessions/{sid}")[0] == 404


def test_a_key_pinned_to_a_user_acts_for_that_user_only(veil: VeilThread) -> None:
    ann = chat(veil, "I am Ann.", key=KEY_ANN)
    opened = veil.events(ann)[0]
    assert isinstance(opened, SessionOpened) and opened.user_id == "ann"
    # It may name its own user, never another.
    chat(veil, "Still Ann.", ann, key=KEY_ANN, user="ann")
    with pytest.raises(openai.PermissionDeniedError) as refused:
        chat(veil, "I am Bob now.", ann, key=KEY_ANN, user="bob")
    assert refused.value.body["code"] == "user_not_allowed"
    # Another user's key of the same tenant does not find Ann's session, in any way.
    with pytest.raises(openai.NotFoundError):
        chat(veil, "Let me in.", ann, key=KEY_BOB)
    for method, path in [
        ("GET", f"/sessions/{ann}"),
        ("GET", f"/sessions/{ann}/messages"),
        ("GET", f"/sessions/{ann}/memories?q=ann"),
        ("DELETE", f"/sessions/{ann}"),
    ]:
        status, _ = api(veil, method, path, key=KEY_BOB)
        assert status == 404, (method, path)
    # A key of the tenant that is pinned to no user sees every session of the tenant.
    assert api(veil, "GET", f"/sessions/{ann}", key=KEY_A)[0] == 200
    assert api(veil, "GET", f"/sessions/{ann}", key=KEY_ANN)[0] == 200
