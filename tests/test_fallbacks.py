"""Retries with backoff and fallbacks along a pipeline's chain, each attempt in the log."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import openai
import pytest

from config import (
    Config,
    EngineConfig,
    FallbackConfig,
    MemoryConfig,
    ModelConfig,
    PipelineConfig,
)
from eventstore.events import ModelCall, ReplyCompleted, TurnFailed, model_calls
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread


@pytest.fixture(scope="module")
def primary() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply="from primary") as fake:
        yield fake


@pytest.fixture(scope="module")
def secondary() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply="from secondary") as fake:
        yield fake


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


GONE_PORT = _closed_port()


@pytest.fixture(scope="module")
def veil(nats_url: str, primary: FakeOpenAI, secondary: FakeOpenAI) -> Iterator[VeilThread]:
    config = Config(
        engines={
            "gone": EngineConfig(
                kind="openai", base_url=f"http://127.0.0.1:{GONE_PORT}/v1", api_key="x"
            ),
            "primary": EngineConfig(
                kind="openai", base_url=primary.base_url, api_key="x", timeout=2
            ),
            "secondary": EngineConfig(
                kind="openai", base_url=secondary.base_url, api_key="x", timeout=2
            ),
        },
        pipelines={
            "default": PipelineConfig(
                engine="primary",
                model="big",
                fallbacks=[FallbackConfig(engine="secondary", model="small")],
                retries=1,
                retry_backoff=0.01,
            ),
            "gone": PipelineConfig(engine="gone", model="m", retries=0),
        },
        models=[
            ModelConfig(name="veil", pipeline="default"),
            ModelConfig(name="veil-gone", pipeline="gone"),
        ],
        nats_url=nats_url,
        memory=MemoryConfig(enabled=False),  # long-term memory has its own tests
    )
    with VeilThread(config, nats_url) as server:
        yield server


@pytest.fixture(autouse=True)
def _reset(primary: FakeOpenAI, secondary: FakeOpenAI) -> None:
    primary.reset()
    secondary.reset()


@pytest.fixture
def client(veil: VeilThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=veil.base_url, api_key="x", max_retries=0, timeout=20) as c:
        yield c


def calls(veil: VeilThread, sid: str) -> list[ModelCall]:
    return model_calls(veil.events(sid))


def test_falls_back_after_retries_and_records_every_attempt(
    veil: VeilThread, client: openai.OpenAI, primary: FakeOpenAI, secondary: FakeOpenAI
) -> None:
    primary.fail_next(429, message="rate limited", times=2)
    reply = client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content == "from secondary"
    assert reply.model == "veil"
    assert len(primary.requests) == 2 and len(secondary.requests) == 1
    assert secondary.last_request.body["model"] == "small"
    attempts = calls(veil, reply.model_extra["session_id"])
    assert [(c.engine, c.upstream_model, c.status) for c in attempts] == [
        ("primary", "big", 502),
        ("primary", "big", 502),
        ("secondary", "small", None),
    ]
    assert all("rate limited" in (c.error or "") for c in attempts[:2])


def test_retry_after_is_honoured(
    veil: VeilThread, client: openai.OpenAI, primary: FakeOpenAI, secondary: FakeOpenAI
) -> None:
    primary.fail_next(503, message="busy", retry_after=0.4)
    started = time.monotonic()
    reply = client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "hi"}]
    )
    assert time.monotonic() - started >= 0.4
    assert reply.choices[0].message.content == "from primary"
    assert len(secondary.requests) == 0
    assert [c.status for c in calls(veil, reply.model_extra["session_id"])] == [502, None]


def test_client_errors_upstream_are_not_retried(
    veil: VeilThread, client: openai.OpenAI, primary: FakeOpenAI, secondary: FakeOpenAI
) -> None:
    primary.fail_next(400, message="bad prompt")
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="veil", messages=[{"role": "user", "content": "hi"}])
    message = info.value.body["message"]
    assert info.value.status_code == 502 and "HTTP 400" in message and "bad prompt" not in message
    assert len(primary.requests) == 1 and len(secondary.requests) == 0


def test_every_link_failing_gives_the_last_error(
    veil: VeilThread, client: openai.OpenAI, primary: FakeOpenAI, secondary: FakeOpenAI
) -> None:
    primary.fail_next(500, message="primary down", times=2)
    secondary.fail_next(500, message="secondary down", times=2)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="veil", messages=[{"role": "user", "content": "hi"}])
    message = info.value.body["message"]
    assert info.value.status_code == 502 and "HTTP 500" in message and "down" not in message
    assert len(primary.requests) == 2 and len(secondary.requests) == 2


def test_a_stream_that_reached_the_client_is_not_restarted(
    veil: VeilThread, client: openai.OpenAI, primary: FakeOpenAI, secondary: FakeOpenAI
) -> None:
    primary.reply = "one two three four five six"
    try:
        primary.break_stream_after(2)
        stream = client.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        got: list[str] = []
        with pytest.raises(openai.APIError):
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    got.append(chunk.choices[0].delta.content)
        assert "".join(got) == "one two"
        assert len(secondary.requests) == 0 and len(primary.requests) == 1
    finally:
        primary.reply = "from primary"


def test_stream_failing_before_any_token_falls_back(
    veil: VeilThread, client: openai.OpenAI, primary: FakeOpenAI, secondary: FakeOpenAI
) -> None:
    primary.fail_next(502, message="gateway", times=2)
    chunks = list(
        client.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "from secondary"
    )
    sid = chunks[0].model_extra["session_id"]
    events = veil.events(sid)
    assert isinstance(events[-1], ReplyCompleted) and not any(
        isinstance(e, TurnFailed) for e in events
    )


def test_clients_never_see_the_upstreams_address_or_errors_operators_do(
    veil: VeilThread, client: openai.OpenAI
) -> None:
    first = client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "hi"}]
    )
    sid = first.model_extra["session_id"]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="veil-gone",
            messages=[{"role": "user", "content": "again"}],
            extra_body={"session_id": sid},
        )
    body = info.value.body
    assert info.value.status_code == 502 and body["code"] == "upstream_unreachable"
    assert body["message"] == "The upstream model could not be reached."
    for inside in (str(GONE_PORT), "127.0.0.1", "Error", "/v1"):
        assert inside not in str(body)
    # The log keeps what happened, for the operator who replays the session.
    failed = [c for c in calls(veil, sid) if c.status == 502]
    assert failed and f"127.0.0.1:{GONE_PORT}" in (failed[0].error or "")
    # A call that never connected consumed nothing: no token count, not even an estimate.
    assert failed[0].usage is None and not failed[0].usage_estimated
