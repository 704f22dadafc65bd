"""One session through all three doors: each turn is recorded with the door it came through,
and the audit (the log, the turn traces, `veil replay`) names it."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import pytest

from config import ApiKey, Config, EngineConfig, MemoryConfig, ModelConfig, PipelineConfig
from eventstore.events import TurnStarted
from testkit.procs import run_veil
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread
from tests.test_gateway import http

KEY = "sk-doors"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def veil(nats_url: str, upstream: FakeOpenAI) -> Iterator[VeilThread]:
    config = Config(
        keys=[ApiKey(key=KEY, tenant="doors")],
        engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
        pipelines={"default": PipelineConfig(engine="up", model="m")},
        models=[ModelConfig(name="veil", pipeline="default")],
        memory=MemoryConfig(enabled=False),
        nats_url=nats_url,
    )
    with VeilThread(config, nats_url) as server:
        yield server


def test_each_turn_names_its_door(veil: VeilThread, upstream: FakeOpenAI, nats_url: str) -> None:
    with openai.OpenAI(base_url=veil.base_url, api_key=KEY, max_retries=0) as client:
        first = client.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": "one by chat"}]
        )
        sid = str(first.model_extra["session_id"])
        door = anthropic.Anthropic(
            base_url=veil.base_url.removesuffix("/v1"), api_key=KEY, max_retries=0
        )
        door.messages.create(
            model="veil",
            max_tokens=50,
            messages=[{"role": "user", "content": "two by messages"}],
            extra_headers={"X-Session-Id": sid},
        )
        client.responses.create(model="veil", input="three by responses", conversation=sid)
    # One session: the last turn's model saw all three.
    seen = str(upstream.last_request.body["messages"])
    assert "one by chat" in seen and "two by messages" in seen
    doors = [e.door for e in veil.events(sid, "doors") if isinstance(e, TurnStarted)]
    assert doors == ["chat.completions", "messages", "responses"]

    reply = http("GET", f"{veil.base_url}/sessions/{sid}/turns", headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert [t["door"] for t in reply.json()["data"]] == doors

    replay = run_veil("replay", sid, "--tenant", "doors", env={"VEIL_NATS_URL": nats_url})
    assert replay.returncode == 0, replay.stderr
    for name in doors:
        assert f"started through {name}:" in replay.stdout, replay.stdout
