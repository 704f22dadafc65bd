"""A session deleted while its first turn is being indexed leaves nothing in the memory index.

The projection reads a turn as soon as it is logged and embeds its messages (seconds
for a long turn) before it stores them: a DELETE lands before, during or after that.
Whatever the moment, once the projection has caught up with the log no byte of the
session is left in the data directory and recall finds none of it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from config import ApiKey, Config, EngineConfig, MemoryConfig, ModelConfig, PipelineConfig
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread
from tests.test_gateway import http
from veil.natsserver import NatsServer

KEY = "sk-forgetting-race"
USER = "racer"
MESSAGES = 150
# Some 60 tokens a message: long enough that embedding a turn takes a while.
FILLER = (
    "we walked along the old canal towpath past the lock keeper's cottage, counted the"
    " narrowboats moored by the brewery and argued about whether the heron on the weir"
    " was the same one we saw last spring"
)


@pytest.fixture(scope="module")
def veil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VeilThread]:
    # A NATS server of its own: no other module's workers serve these sessions.
    with (
        NatsServer(tmp_path_factory.mktemp("race-nats")) as nats_server,
        FakeOpenAI() as upstream,  # replies "echo: <last message>": the marker again
    ):
        config = Config(
            keys=[ApiKey(key=KEY, tenant="t")],
            engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
            pipelines={"default": PipelineConfig(engine="up", model="m", summarize=False)},
            models=[ModelConfig(name="veil", pipeline="default")],
            # Index each turn as soon as it is logged, so a DELETE meets it mid-way.
            memory=MemoryConfig(max_lag=0.0),
            nats_url=nats_server.url,
            data_dir=str(tmp_path_factory.mktemp("race-data")),
        )
        with VeilThread(config, nats_server.url) as server:
            yield server


def first_turn(veil: VeilThread, marker: str) -> str:
    """Open a session with a long first turn, every message carrying `marker`; its id."""
    messages: list[Any] = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{marker} {i}: {FILLER}"}
        for i in range(MESSAGES)
    ]
    with openai.OpenAI(base_url=veil.base_url, api_key=KEY, max_retries=0, timeout=60) as client:
        reply = client.chat.completions.create(model="veil", messages=messages, user=USER)
    return str(reply.model_extra["session_id"])  # type: ignore[index]


def delete(veil: VeilThread, sid: str) -> None:
    r = http(
        "DELETE", f"{veil.base_url}/sessions/{sid}", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 200


def recalled(veil: VeilThread, sid: str, query: str) -> list[str]:
    """What the memory search of session `sid` (and so of its user) finds for `query`."""
    r = http(
        "GET",
        f"{veil.base_url}/sessions/{sid}/memories?q={query}&limit=100",
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 200
    return [str(hit["content"]) for hit in r.json()["data"]]


def test_a_session_deleted_while_it_is_indexed_never_comes_back(veil: VeilThread) -> None:
    # When the DELETE comes; correctness depends on none of them.
    waits: dict[str, Callable[[], None]] = {
        "at once": lambda: None,  # the projection is still embedding the turn
        "a moment later": lambda: time.sleep(0.3),  # before, during or after the write
        "once indexed": veil.wait_for_memory,  # the rows are there to delete
    }
    deleted: dict[str, str] = {}
    for when, wait in waits.items():
        marker = f"zq{uuid.uuid4().hex[:12]}"
        sid = first_turn(veil, marker)
        wait()
        delete(veil, sid)
        deleted[marker] = f"{when}: {sid}"
    kept = f"zq{uuid.uuid4().hex[:12]}"
    survivor = first_turn(veil, kept)  # the same user: its search covers theirs
    veil.wait_for_memory()

    data = Path(veil.config.data_dir)
    files = [p for p in data.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"memory.sqlite"}
    leftovers = [
        (why, p.name)
        for p in files
        for marker, why in deleted.items()
        if marker.encode() in p.read_bytes()
    ]
    assert leftovers == []
    for marker in deleted:
        assert not [text for text in recalled(veil, survivor, marker) if marker in text]
    # The checks can see a session that was not deleted.
    assert any(kept.encode() in p.read_bytes() for p in files)
    assert [text for text in recalled(veil, survivor, kept) if kept in text]
