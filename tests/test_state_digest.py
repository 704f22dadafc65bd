"""A session state's digest: a snapshot plus the rest of the log digests as the whole log
does, and the live actor's digest (GET /v1/sessions/{id}, audit keys) equals
`veil replay --digest`."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import session, snapshots
from actors.state_digest import state_digest
from config import ApiKey, Config, EngineConfig, MemoryConfig, ModelConfig, PipelineConfig
from testkit.procs import run_veil
from testkit.upstreams import FakeOpenAI
from tests.actors.test_snapshots import _OPS, SID, TENANT, _log
from tests.harness import VeilThread
from tests.test_gateway import http

CHAT = "sk-digest-chat"
AUDIT = "sk-digest-audit"
ADMIN = "sk-digest-admin"


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(_OPS, min_size=1, max_size=40), cut=st.floats(min_value=0, max_value=1))
def test_a_snapshot_and_the_rest_digest_as_the_whole_log(
    ops: list[tuple[str, int]], cut: float
) -> None:
    events = _log(ops)
    at = max(1, round(cut * len(events)))
    # Through the snapshot's own encoding, as an activation reads it.
    found = snapshots.decode(
        snapshots.encode(TENANT, SID, at, session.fold(events[:at])), TENANT, SID
    )
    assert found is not None
    assert state_digest(session.fold(events[at:], found.state)) == state_digest(
        session.fold(events)
    )


def test_the_digest_tells_states_apart_and_ignores_dict_order() -> None:
    events = _log([("reply", 1), ("meta", 2), ("reply", 3)])
    full, shorter = session.fold(events), session.fold(events[:-1])
    assert state_digest(full) != state_digest(shorter)
    flipped = session.SessionState(
        **{
            **{f: getattr(full, f) for f in full.__struct_fields__},
            "outcomes": dict(reversed(full.outcomes.items())),
        }
    )
    assert list(flipped.outcomes) != list(full.outcomes)
    assert state_digest(flipped) == state_digest(full)


@pytest.fixture(scope="module")
def veil(nats_url: str) -> Iterator[VeilThread]:
    with FakeOpenAI() as upstream:
        config = Config(
            keys=[
                ApiKey(key=CHAT, tenant="d"),
                ApiKey(key=AUDIT, tenant="d", scopes=["audit"]),
                ApiKey(key=ADMIN, tenant="d", admin=True),
            ],
            engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
            pipelines={"default": PipelineConfig(engine="up", model="m")},
            models=[ModelConfig(name="veil", pipeline="default")],
            nats_url=nats_url,
            memory=MemoryConfig(enabled=False),
        )
        with VeilThread(config, nats_url) as server:
            yield server


def _get(veil: VeilThread, sid: str, key: str) -> dict[str, object]:
    reply = http(
        "GET", f"{veil.base_url}/sessions/{sid}", headers={"Authorization": f"Bearer {key}"}
    )
    assert reply.status_code == 200, reply.body
    body = reply.json()
    assert isinstance(body, dict)
    return body


def test_the_live_digest_is_the_replayed_one(veil: VeilThread, nats_url: str) -> None:
    with openai.OpenAI(base_url=veil.base_url, api_key=CHAT, max_retries=0) as client:
        first = client.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": "one"}]
        )
        sid = str((first.model_extra or {})["session_id"])
        stream = client.chat.completions.create(
            model="veil",
            messages=[{"role": "user", "content": "two"}],
            stream=True,
            extra_headers={"X-Session-Id": sid, "Idempotency-Key": "digest-two"},
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "state_digest" not in _get(veil, sid, CHAT), "only audits see it"
    live = _get(veil, sid, AUDIT)["state_digest"]
    assert isinstance(live, str) and len(live) == 64
    assert _get(veil, sid, ADMIN)["state_digest"] == live
    replayed = run_veil(
        "replay", sid, "--digest", env={"VEIL_NATS_URL": nats_url, "VEIL_CONFIG": ""}
    )
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.strip() == live
