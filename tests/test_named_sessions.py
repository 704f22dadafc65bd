"""Sessions a client names: opened on first use, continued after, and scoped to the tenant.

Two tenants that use the same name get two sessions that never meet: history, memory,
usage, turn traces and deletion each stay with their own tenant (DESIGN.md, session id
contract). Spoken to over real HTTP with the official SDK, on a real nats-server.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from bus.requests import nats_request
from bus.subjects import USAGE_QUERY
from config import ApiKey, Config, EngineConfig, MemoryConfig, ModelConfig, PipelineConfig
from contracts.usage import USAGE_QUERY_CODEC, USAGE_REPORT_CODEC, UsageQuery
from eventstore.events import SessionOpened
from testkit.procs import run_veil
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread
from tests.test_gateway import http

RED, BLUE = "sk-named-red", "sk-named-blue"
# Keys of the same tenants that only the two-tenant test uses: its usage is all theirs.
RED2, BLUE2 = "sk-named-red-2", "sk-named-blue-2"
# Two keys of tenant green, each pinned to one end user.
ANN, BOB = "sk-named-green-ann", "sk-named-green-bob"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def veil(nats_url: str, upstream: FakeOpenAI) -> Iterator[VeilThread]:
    config = Config(
        keys=[
            ApiKey(key=RED, tenant="red"),
            ApiKey(key=BLUE, tenant="blue"),
            ApiKey(key=RED2, tenant="red"),
            ApiKey(key=BLUE2, tenant="blue"),
            ApiKey(key=ANN, tenant="green", user="ann"),
            ApiKey(key=BOB, tenant="green", user="bob"),
        ],
        engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
        pipelines={"default": PipelineConfig(engine="up", model="m")},
        models=[ModelConfig(name="veil", pipeline="default")],
        memory=MemoryConfig(enabled=True),
        nats_url=nats_url,
    )
    with VeilThread(config, nats_url) as server:
        yield server


def client(veil: VeilThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=veil.base_url, api_key=key, max_retries=0)


def chat(veil: VeilThread, key: str, text: str, name: str) -> Any:
    with client(veil, key) as sdk:
        return sdk.chat.completions.create(
            model="veil",
            messages=[{"role": "user", "content": text}],
            extra_body={"session_id": name},
        )


def call(veil: VeilThread, method: str, path: str, key: str) -> tuple[int, Any]:
    reply = http(method, f"{veil.base_url}{path}", headers={"Authorization": f"Bearer {key}"})
    return reply.status_code, reply.json()


def sent_texts(upstream: FakeOpenAI) -> list[str]:
    return [m["content"] for m in upstream.last_request.body["messages"]]


def settle_usage(veil: VeilThread) -> None:
    """Wait until the usage ledger has applied everything in the log."""

    async def caught_up() -> None:
        nc = veil.workers.nc
        last = (await nc.jetstream().stream_info("CHAT_EVENTS")).state.last_seq
        ask = USAGE_QUERY_CODEC.encode(UsageQuery(limit=1))
        while True:
            reply = await nats_request(nc, USAGE_QUERY, ask, timeout=5)
            if USAGE_REPORT_CODEC.decode(reply.data).applied_seq >= last:
                return
            await asyncio.sleep(0.02)

    veil.call(caught_up())


def test_a_name_the_client_chooses_opens_a_session_on_first_use(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    name = f"conv-{uuid.uuid4()}"  # a chat front end's own conversation id
    assert call(veil, "GET", f"/sessions/{name}", RED)[0] == 404  # reads open nothing
    with client(veil, RED) as sdk:
        # Named as metadata.session_id, the field OpenAI's SDKs send without extra options.
        first = sdk.chat.completions.with_raw_response.create(
            model="veil",
            messages=[{"role": "user", "content": "Hello, I'm Ann."}],
            metadata={"session_id": name},
        )
        assert first.headers["X-Session-Id"] == name
        assert first.parse().model_extra["session_id"] == name
        # Continued with the header, streaming.
        stream = sdk.chat.completions.create(
            model="veil",
            messages=[{"role": "user", "content": "Who am I?"}],
            stream=True,
            extra_headers={"X-Session-Id": name},
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == "echo: Who am I?"
    assert sent_texts(upstream) == ["Hello, I'm Ann.", "echo: Hello, I'm Ann.", "Who am I?"]
    status, view = call(veil, "GET", f"/sessions/{name}", RED)
    assert status == 200 and view["id"] == name and view["turns"] == 2


def test_a_streamed_first_turn_opens_a_named_session_too(veil: VeilThread) -> None:
    name = f"stream-{uuid.uuid4().hex}"
    with client(veil, RED) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            model="veil",
            messages=[{"role": "user", "content": "first"}],
            stream=True,
            extra_body={"session_id": name},
        )
        assert raw.headers["X-Session-Id"] == name
        assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert call(veil, "GET", f"/sessions/{name}", RED)[1]["turns"] == 1


def test_two_tenants_with_one_name_get_two_sessions(veil: VeilThread, upstream: FakeOpenAI) -> None:
    name = f"shared-{uuid.uuid4().hex[:12]}"
    red_word, blue_word = f"marmot{uuid.uuid4().hex[:8]}", f"ocelot{uuid.uuid4().hex[:8]}"
    # Interleaved, so that each tenant's words follow the other's opening in the log.
    red = [chat(veil, RED2, "Hello.", name)]
    blue = [chat(veil, BLUE2, "Hello.", name)]
    red.append(chat(veil, RED2, f"My pet is a {red_word}.", name))
    blue.append(chat(veil, BLUE2, f"My pet is an {blue_word}.", name))
    veil.wait_for_memory()
    red.append(chat(veil, RED2, "What is my pet?", name))
    assert red_word in str(sent_texts(upstream)) and blue_word not in str(sent_texts(upstream))
    blue.append(chat(veil, BLUE2, "What is my pet?", name))
    assert blue_word in str(sent_texts(upstream)) and red_word not in str(sent_texts(upstream))
    veil.wait_for_memory()

    for key, own, other, replies in (
        (RED2, red_word, blue_word, red),
        (BLUE2, blue_word, red_word, blue),
    ):
        # History.
        status, listed = call(veil, "GET", f"/sessions/{name}/messages", key)
        assert status == 200 and len(listed["data"]) == 6
        assert own in str(listed) and other not in str(listed)
        # Memory.
        status, found = call(veil, "GET", f"/sessions/{name}/memories?q=pet", key)
        assert status == 200 and own in str(found) and other not in str(found)
        # Turn traces: each its own three.
        status, turns = call(veil, "GET", f"/sessions/{name}/turns", key)
        ids = [r.id.removeprefix("chatcmpl-") for r in replies]
        assert status == 200 and [t["id"] for t in turns["data"]] == ids
        # Usage: the session's own, and the tenant's ledger.
        status, view = call(veil, "GET", f"/sessions/{name}", key)
        assert view["usage"]["total_tokens"] == sum(r.usage.total_tokens for r in replies)
    settle_usage(veil)
    for key, tenant, replies in ((RED2, "red", red), (BLUE2, "blue", blue)):
        # A chat key sees its own key's usage: every turn of its tenant's session, no other.
        status, report = call(veil, "GET", "/usage?group_by=tenant", key)
        rows = [r for b in report["data"] for r in b["results"]]
        assert status == 200, report
        billed = [(r["project_id"], r["num_model_requests"], r["input_tokens"]) for r in rows]
        assert billed == [(tenant, 3, sum(r.usage.prompt_tokens for r in replies))]

    # Deleting one leaves the other whole.
    assert call(veil, "DELETE", f"/sessions/{name}", RED2)[0] == 200
    assert call(veil, "GET", f"/sessions/{name}", RED2)[0] == 404
    status, listed = call(veil, "GET", f"/sessions/{name}/messages", BLUE2)
    assert status == 200 and len(listed["data"]) == 6
    status, found = call(veil, "GET", f"/sessions/{name}/memories?q=pet", BLUE2)
    assert status == 200 and blue_word in str(found)
    opened = veil.events(name, "blue")[0]
    assert isinstance(opened, SessionOpened) and opened.tenant == "blue"
    assert veil.events(name, "red") == []


def test_replay_needs_the_tenant_only_when_the_name_is_ambiguous(veil: VeilThread) -> None:
    name = f"audit-{uuid.uuid4().hex[:12]}"
    chat(veil, RED, "red's words", name)
    env = {"VEIL_NATS_URL": veil.nats_url}
    only_red = run_veil("replay", name, env=env)  # one tenant uses the name: no --tenant
    assert only_red.returncode == 0 and "red's words" in only_red.stdout
    chat(veil, BLUE, "blue's words", name)
    ambiguous = run_veil("replay", name, env=env)
    assert ambiguous.returncode == 2 and "--tenant" in ambiguous.stderr
    assert "blue, red" in ambiguous.stderr
    blue = run_veil("replay", name, "--tenant", "blue", env=env)
    assert blue.returncode == 0 and "blue's words" in blue.stdout and "red's" not in blue.stdout
    listed = run_veil("sessions", "--tenant", "red", "--json", env=env).stdout
    assert name in listed and '"tenant":"blue"' not in listed


def test_a_key_pinned_to_a_user_opens_names_for_its_user_only(veil: VeilThread) -> None:
    name = f"pinned-{uuid.uuid4().hex[:12]}"
    chat(veil, ANN, "Ann's notes", name)
    # Bob's key of the same tenant: Ann's session is not his to find, and the name is
    # taken in the tenant, so it answers as an unknown session does, not as a free name.
    with pytest.raises(openai.NotFoundError) as refused:
        chat(veil, BOB, "Let me in.", name)
    assert refused.value.body["code"] == "session_not_found"
    assert call(veil, "GET", f"/sessions/{name}", BOB)[0] == 404
    mine = f"pinned-bob-{uuid.uuid4().hex[:12]}"
    chat(veil, BOB, "Bob's notes", mine)
    opened = veil.events(mine)[0]
    assert isinstance(opened, SessionOpened) and opened.user_id == "bob"
    assert call(veil, "GET", f"/sessions/{mine}", BOB)[1]["turns"] == 1
    assert call(veil, "GET", f"/sessions/{name}", ANN)[1]["turns"] == 1


def test_a_deleted_name_stays_deleted_in_its_tenant_only(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    name = f"gone-{uuid.uuid4().hex[:12]}"
    chat(veil, RED, "to be forgotten", name)
    assert call(veil, "DELETE", f"/sessions/{name}", RED)[0] == 200
    calls = len(upstream.requests)
    with pytest.raises(openai.NotFoundError) as refused:
        chat(veil, RED, "again?", name)
    assert refused.value.body["code"] == "session_not_found"
    assert len(upstream.requests) == calls, "no model was asked"
    # Another tenant's name: free.
    assert chat(veil, BLUE, "mine", name).model_extra["session_id"] == name
    assert call(veil, "GET", f"/sessions/{name}", BLUE)[1]["turns"] == 1
