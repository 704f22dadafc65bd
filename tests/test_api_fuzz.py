"""Schemathesis against the gateway's own /openapi.json: a bounded, seeded run.

A real gateway with its workers, a fake OpenAI upstream and an admin API key (with rate
limits, so their headers are checked too). For every operation, its examples and a few
dozen generated cases, half of them reusing a real model, session, turn, key and
collection so they get past the 404 of a random name; each case is checked for: no 5xx,
no hang (a per-request timeout), an answer the document describes (status, media type,
headers, body), a schema-breaking case refused, auth enforced, and nothing appended to
the sessions' log by a refused request. The longer run: `python bench/fuzz.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import nats
import pytest
import requests
from nats.aio.client import Client

from config import ApiKey, Config, EngineConfig, ModelConfig, PipelineConfig, ServerConfig
from testkit.api_fuzz import fuzz
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread

KEY = "sk-schemathesis"
SEED = 20261206
EXAMPLES = 30  # generated cases per operation (three times that for chat), besides examples


@pytest.fixture(scope="module")
def veil(nats_url: str) -> Iterator[VeilThread]:
    with FakeOpenAI() as upstream:
        config = Config(
            server=ServerConfig(turn_timeout=15, accept_timeout=15, max_body_bytes=256 * 1024),
            # High limits: never reached, but their x-ratelimit-* headers go on the answers.
            keys=[ApiKey(key=KEY, tenant="fuzz", admin=True, rpm=10**6, tpm=10**9)],
            engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
            pipelines={"default": PipelineConfig(engine="up", model="m", retries=0)},
            models=[ModelConfig(name="veil", pipeline="default")],
            nats_url=nats_url,
        )
        with VeilThread(config, nats_url) as server:
            yield server


def _known(base: str) -> dict[str, Any]:
    """A model, session, turn, key and collection that exist, for cases to reuse."""
    auth = {"Authorization": f"Bearer {KEY}"}
    turn = requests.post(
        f"{base}/v1/chat/completions",
        json={"model": "veil", "messages": [{"role": "user", "content": "hello"}]},
        headers=auth,
        timeout=30,
    )
    key = requests.post(f"{base}/v1/admin/keys", json={"tenant": "fuzz"}, headers=auth, timeout=30)
    document = requests.post(
        f"{base}/v1/knowledge/handbook/documents",
        files={"file": ("faq.md", b"# FAQ\n\nVeil keeps each session's log.\n")},
        headers=auth,
        timeout=60,
    )
    assert turn.status_code == 200 and key.status_code == 201 and document.status_code == 200
    return {
        "model": "veil",
        "session_id": turn.json()["session_id"],
        # A session is a conversation; its first message is item msg_0.
        "conversation_id": turn.json()["session_id"],
        "item_id": "msg_0",
        "turn_id": turn.json()["id"].removeprefix("chatcmpl-"),
        "key_id": key.json()["id"],
        "collection": "handbook",
    }


def test_schemathesis_finds_nothing(veil: VeilThread) -> None:
    base = f"http://127.0.0.1:{veil.port}"
    document = requests.get(f"{base}/openapi.json", timeout=30).json()

    async def connect() -> Client:
        return await nats.connect(veil.nats_url)

    nc = veil.call(connect())
    js = nc.jetstream()

    async def last_seq() -> int:
        return int((await js.stream_info("CHAT_EVENTS")).state.last_seq)

    try:
        known = _known(base)
        report = fuzz(
            base,
            document,
            KEY,
            examples=EXAMPLES,
            seed=SEED,
            log_position=lambda: veil.call(last_seq()),
            known=known,
            weights={"POST /v1/chat/completions": 3},  # the endpoint that matters most
            timeout=30,
        )
    finally:
        veil.call(nc.close())
    print(f"\nschemathesis, seed {SEED}, {EXAMPLES} generated cases per operation:")
    print(report.table())
    assert not report.failures, "\n".join([report.table(), *report.failures])
    operations = sum(len(item) for item in document["paths"].values())
    assert len(report.operations) == operations  # every operation was tried
    for name, tried in report.operations.items():
        # Those without parameters may run out of distinct cases (GET /docs has one).
        assert tried.cases >= (EXAMPLES // 2 if "{" in name else 1), (name, tried.cases)
    chat = report.operations["POST /v1/chat/completions"]
    # The run reached past the checks into real turns, and refused plenty (whose
    # log-unchanged check therefore ran); a refused case never grew the log (above).
    assert chat.statuses.get(200, 0) >= 3 and chat.refused >= EXAMPLES // 3, chat.statuses
    assert chat.appended > 0  # the log probe sees the turns' appends: it is live
