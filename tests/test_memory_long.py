"""Long-term memory through the whole system: real NATS, a real SQLite file, the real embedder."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from actors.memory.index import MemoryIndex
from actors.memory.prompting import MEMORY_PREAMBLE
from actors.summary import FACTS_INSTRUCTIONS
from config import ApiKey, Config, EngineConfig, MemoryPolicy, ModelConfig, PipelineConfig
from eventstore.events import FactsExtracted, MemoryRecalled
from testkit.procs import run_veil
from testkit.upstreams import FakeOpenAI, Fault
from tests.harness import VeilThread
from tests.test_gateway import http
from veil.memory_role import index_path
from veil.natsserver import NatsServer

KEY_A = "sk-memory-tenant-a"
KEY_B = "sk-memory-tenant-b"

FILLER = [
    "Can you suggest a recipe for banana bread?",
    "What is the capital of Australia?",
    "How do I convert Celsius to Fahrenheit?",
    "Recommend a podcast about ancient history.",
    "Explain what a mortgage amortisation schedule is.",
    "Write a haiku about autumn leaves.",
    "What time zone is Tokyo in?",
    "How long should I boil an egg?",
    "Tell me a fun fact about octopuses.",
    "What is the difference between a list and a tuple?",
]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    def reply(body: dict[str, Any]) -> str:
        if body["messages"][0]["content"] == FACTS_INSTRUCTIONS:
            return "- The user's dog is named Biscuit.\n- NONE"
        return "Noted."

    with FakeOpenAI(reply=reply) as fake:
        yield fake


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A log of its own: the projection then holds only what these tests wrote."""
    with NatsServer(tmp_path_factory.mktemp("memory-nats")) as server:
        yield server.url


@pytest.fixture(scope="module")
def veil(
    own_nats: str, upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VeilThread]:
    nats_url = own_nats
    config = Config(
        keys=[ApiKey(key=KEY_A, tenant="a"), ApiKey(key=KEY_B, tenant="b")],
        engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
        # A small history budget and no summary: a fact from 50 turns ago can only come back by recall.
        pipelines={
            "default": PipelineConfig(engine="up", model="m", history_budget=200, summarize=False),
            "facts": PipelineConfig(
                engine="up", model="m", memory=MemoryPolicy(extract_facts=True)
            ),
        },
        models=[
            ModelConfig(name="veil", pipeline="default"),
            ModelConfig(name="veil-facts", pipeline="facts"),
        ],
        nats_url=nats_url,
        data_dir=str(tmp_path_factory.mktemp("memory-data")),
    )
    with VeilThread(config, nats_url) as server:
        yield server


def client(veil: VeilThread, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=veil.base_url, api_key=key, max_retries=0, timeout=30)


def say(
    veil: VeilThread,
    text: str,
    sid: str | None = None,
    *,
    user: str | None = None,
    key: str = KEY_A,
    model: str = "veil",
) -> str:
    extra: dict[str, Any] = {}
    if sid:
        extra["session_id"] = sid
    with client(veil, key) as c:
        reply = c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": text}],
            extra_body=extra or None,
            **({"user": user} if user else {}),
        )
    return str(reply.model_extra["session_id"])


def system_of(upstream: FakeOpenAI) -> str:
    first = upstream.last_request.body["messages"][0]
    return first["content"] if first["role"] == "system" else ""


def test_recall_finds_a_fact_from_fifty_turns_ago(veil: VeilThread, upstream: FakeOpenAI) -> None:
    sid = say(veil, "Please remember that my locker combination is 31-07-44.")
    for i in range(50):
        say(veil, f"{FILLER[i % len(FILLER)]} (question {i})", sid)
    veil.wait_for_memory()
    say(veil, "Remind me, what is the combination of my locker?", sid)
    prompt = upstream.last_request.body["messages"]
    assert all("31-07-44" not in m["content"] for m in prompt[1:]), "not in the recent history"
    system = system_of(upstream)
    assert MEMORY_PREAMBLE in system and "<memories>" in system
    # The turn as one item, the message and its reply, quoted as data.
    assert '"Please remember that my locker combination is 31-07-44.\\nAssistant: Noted."' in system
    recalled = [e for e in veil.events(sid) if isinstance(e, MemoryRecalled)][-1]
    used = [h for h in recalled.hits if h.used]
    assert any(h.text and "31-07-44" in h.text for h in used)
    assert recalled.query == "Remind me, what is the combination of my locker?"
    assert all(h.session_id == sid for h in recalled.hits)


def test_memories_are_shared_by_a_user_and_never_across_users_or_tenants(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    marker = f"heron-{uuid.uuid4().hex[:8]}"
    alice_1 = say(veil, f"My secret project codename is {marker}.", user="alice")
    veil.wait_for_memory()
    # Alice's other session sees it; the text is referenced, not copied.
    alice_2 = say(veil, "What is my secret project codename?", user="alice")
    assert marker in system_of(upstream)
    hits = [e for e in veil.events(alice_2) if isinstance(e, MemoryRecalled)][-1].hits
    from_first = [h for h in hits if h.session_id == alice_1]
    assert from_first and all(h.text is None for h in from_first)
    # Bob in the same tenant, a session without a user, and alice in another tenant see nothing.
    for kwargs in ({"user": "bob"}, {}, {"user": "alice", "key": KEY_B}):
        sid = say(veil, "What is my secret project codename?", **kwargs)  # type: ignore[arg-type]
        assert marker not in json.dumps(upstream.last_request.body)
        recalled = [e for e in veil.events(sid) if isinstance(e, MemoryRecalled)]
        assert all(h.session_id == sid for r in recalled for h in r.hits)

    # The audit resolves the reference while the source exists...
    env = {"VEIL_NATS_URL": veil.nats_url}
    out = run_veil("replay", alice_2, env=env).stdout
    assert marker in out and f"from {alice_1}#" in out
    # ...and after the source session is deleted, nothing of it is left anywhere.
    status = http(
        "DELETE",
        f"{veil.base_url}/sessions/{alice_1}",
        headers={"Authorization": f"Bearer {KEY_A}"},
    ).status_code
    assert status == 200
    out = run_veil("replay", alice_2, env=env).stdout
    assert marker not in out and "[deleted: its session no longer exists]" in out
    say(veil, "What is my secret project codename?", user="alice")
    assert marker not in json.dumps(upstream.last_request.body)
    path = index_path(veil.config)
    leftovers = [p for p in path.parent.glob(path.name + "*") if marker.encode() in p.read_bytes()]
    assert leftovers == []


def test_memory_search_endpoint(veil: VeilThread) -> None:
    sid = say(veil, "I keep my bicycle in the blue shed behind the house.")
    say(veil, "Also, my favourite tea is genmaicha.", sid)
    veil.wait_for_memory()
    r = http(
        "GET",
        f"{veil.base_url}/sessions/{sid}/memories?q=where%20is%20the%20bike",
        headers={"Authorization": f"Bearer {KEY_A}"},
    )
    assert r.status_code == 200
    data = r.json()["data"]
    assert data and "bicycle" in data[0]["content"] and data[0]["session_id"] == sid
    foreign = http(
        "GET",
        f"{veil.base_url}/sessions/{sid}/memories?q=bike",
        headers={"Authorization": f"Bearer {KEY_B}"},
    )
    assert foreign.status_code == 404
    missing_q = http(
        "GET",
        f"{veil.base_url}/sessions/{sid}/memories",
        headers={"Authorization": f"Bearer {KEY_A}"},
    )
    assert missing_q.status_code == 400 and missing_q.json()["error"]["param"] == "q"


def indexed_rows(veil: VeilThread) -> list[Any]:
    """Every row of the live memory index, once the projection has caught up."""
    veil.wait_for_memory()
    live = veil.workers.memory
    assert live is not None
    return veil.call(live.index.dump())


def test_reindex_reproduces_the_live_projection(veil: VeilThread, tmp_path: Path) -> None:
    say(veil, "Index me: the lighthouse keeper's name is Morwenna.")
    live_rows = indexed_rows(veil)
    # Rebuild into another file from the same log and compare.
    other = tmp_path / "rebuilt"
    env = {"VEIL_NATS_URL": veil.nats_url, "VEIL_DATA_DIR": str(other)}
    result = run_veil("reindex", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Reindexed" in result.stdout and "%" in result.stderr  # the progress bar

    async def rebuilt_rows() -> list[Any]:
        index = await MemoryIndex.open(other / "memory.sqlite")
        try:
            return await index.dump()
        finally:
            await index.close()

    assert asyncio.run(rebuilt_rows()) == live_rows
    # A running Veil's index is not rebuilt under its feet.
    busy = run_veil(
        "reindex", env={"VEIL_NATS_URL": veil.nats_url, "VEIL_DATA_DIR": veil.config.data_dir}
    )
    assert busy.returncode != 0 and "in use" in (busy.stderr + busy.stdout)


def test_an_index_another_model_made_is_rebuilt_from_the_log_at_start(
    veil: VeilThread, own_nats: str, tmp_path: Path
) -> None:
    say(veil, "Rebuild me: the ferry to the island leaves at 7:40.")
    live_rows = indexed_rows(veil)
    checkpoint = veil.call(veil.workers.memory.index.checkpoint())  # type: ignore[union-attr]
    data = tmp_path / "older"
    data.mkdir()

    async def older_index() -> None:
        # Complete up to the end of the log, as far as it knows, but made by another model.
        index = await MemoryIndex.open(data / "memory.sqlite", model="an-older-model")
        try:
            await index.add([], np.zeros((0, 384), np.float32), checkpoint=checkpoint)
        finally:
            await index.close()

    asyncio.run(older_index())
    config = Config(
        nats_url=own_nats,
        data_dir=str(data),
        engines=veil.config.engines,
        pipelines=veil.config.pipelines,
        models=veil.config.models,
        keys=veil.config.keys,
    )
    with VeilThread(config, own_nats) as second:
        second.wait_for_memory()
        memory = second.workers.memory
        assert memory is not None and memory.index.model_changed
        assert second.call(memory.index.dump()) == live_rows


def test_extracted_facts_are_remembered(veil: VeilThread, upstream: FakeOpenAI) -> None:
    sid = say(veil, "We got a puppy last week and called him Biscuit!", model="veil-facts")
    # Extraction runs after the reply went out: give it a moment.
    deadline = time.monotonic() + 10
    while (
        not (facts := [e for e in veil.events(sid) if isinstance(e, FactsExtracted)])
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert [f.facts for f in facts] == [["The user's dog is named Biscuit."]]
    veil.wait_for_memory()
    r = http(
        "GET",
        f"{veil.base_url}/sessions/{sid}/memories?q=what%20is%20my%20pet%20called",
        headers={"Authorization": f"Bearer {KEY_A}"},
    )
    found = [(h["kind"], h["content"]) for h in r.json()["data"]]
    assert ("fact", "The user's dog is named Biscuit.") in found
    out = run_veil("replay", sid, env={"VEIL_NATS_URL": veil.nats_url}).stdout
    assert "facts extracted" in out and "model called for the facts" in out


def test_a_session_the_prompt_carries_whole_does_not_ask_memory(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    # Scoped to itself, with every message in the prompt: recall could only find those.
    sid = say(veil, "My badge number is 4411.")
    veil.wait_for_memory()
    say(veil, "What is my badge number?", sid)
    assert "<memories>" not in system_of(upstream)
    assert not [e for e in veil.events(sid) if isinstance(e, MemoryRecalled)]


def test_fact_extraction_does_not_hold_the_sessions_next_turn(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    # The turn's own call answers at once; the fact extraction after it waits for the gate.
    upstream.inject(Fault())
    gate = upstream.hold()
    try:
        sid = say(veil, "My sister Maya lives in Lisbon.", model="veil-facts")
        deadline = time.monotonic() + 10
        while upstream.pending() < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert upstream.pending() == 1, "the extraction is running"
        say(veil, "And what should I pack for a trip there?", sid, model="veil-facts")
    finally:
        gate.set()
    deadline = time.monotonic() + 10
    while (
        len([e for e in veil.events(sid) if isinstance(e, FactsExtracted)]) < 2
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    kinds = [type(e).__name__ for e in veil.events(sid)]
    # The second turn completed while the first turn's extraction still ran.
    assert (
        kinds.index("FactsExtracted") > [i for i, k in enumerate(kinds) if k == "ReplyCompleted"][1]
    )


def test_a_failed_first_turn_leaves_no_memory_behind(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    upstream.fail_next(400, message="bad request upstream")
    with pytest.raises(openai.APIStatusError):
        say(veil, "My safe's code is 7741-ZULU.", user="orphan-check")
    sid = say(veil, "Hello again.", user="orphan-check")
    veil.wait_for_memory()
    r = http(
        "GET",
        f"{veil.base_url}/sessions/{sid}/memories?q=safe%20code%207741%20ZULU",
        headers={"Authorization": f"Bearer {KEY_A}"},
    )
    assert r.status_code == 200
    assert all("7741" not in h["content"] for h in r.json()["data"]), r.json()["data"]
