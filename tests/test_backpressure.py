"""Backpressure: past a session's mailbox bound or the worker's turns in flight, a turn
gets a fast 503 `server_is_overloaded` with Retry-After instead of queueing without end.

What was admitted still runs, in order; nothing of a refused turn reaches the log;
reads are served while the worker is saturated; the bounds are configuration, checked
when it loads. The upstream holds its answers until the test lets them go, so "while
the queue is full" is a fact, not a timing.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from config import (
    ApiKey,
    Config,
    ConfigError,
    EngineConfig,
    MemoryConfig,
    ModelConfig,
    PipelineConfig,
    ServerConfig,
    load_config,
)
from eventstore.events import TurnStarted
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread
from veil.natsserver import NatsServer

KEY = "sk-backpressure"
QUEUED, IN_FLIGHT = 2, 4
# Hang detectors only: every wait below ends on an event long before this.
PATIENCE = 30.0


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("backpressure-nats")) as server:
        yield server


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def veil(own_nats: NatsServer, upstream: FakeOpenAI) -> Iterator[VeilThread]:
    config = Config(
        server=ServerConfig(
            turn_timeout=120,
            accept_timeout=120,
            max_queued_per_session=QUEUED,
            max_turns_in_flight=IN_FLIGHT,
        ),
        keys=[ApiKey(key=KEY, tenant="tenant-a")],
        engines={
            "up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x", timeout=120)
        },
        pipelines={"default": PipelineConfig(engine="up", model="m", retries=0)},
        models=[ModelConfig(name="veil", pipeline="default")],
        nats_url=own_nats.url,
        memory=MemoryConfig(enabled=False),
    )
    with VeilThread(config, own_nats.url) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean(upstream: FakeOpenAI, veil: VeilThread) -> Iterator[None]:
    upstream.reset()
    yield
    # Nothing of one test is still in flight when the next begins.
    _wait_until(lambda: veil.workers.sessions.in_flight == 0, "the turns to finish")


def _client(veil: VeilThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=veil.base_url, api_key=KEY, max_retries=0, timeout=PATIENCE)


def _call(
    veil: VeilThread, method: str, path: str, body: Any = None
) -> tuple[int, dict[str, str], Any]:
    """One plain HTTP call: the status, the headers and the decoded JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", veil.port, timeout=PATIENCE)
    try:
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, f"/v1{path}", body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        return response.status, dict(response.getheaders()), json.loads(raw) if raw else None
    finally:
        conn.close()


def _chat(veil: VeilThread, text: str, sid: str | None = None) -> tuple[int, dict[str, str], Any]:
    body: dict[str, Any] = {"model": "veil", "messages": [{"role": "user", "content": text}]}
    if sid is not None:
        body["session_id"] = sid
    return _call(veil, "POST", "/chat/completions", body)


def _in_background(target: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(target()), daemon=True)
    thread.start()
    return thread, out


def _wait_until(condition: Any, what: str) -> None:
    done = threading.Event()
    for _ in range(int(PATIENCE / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError(f"gave up waiting for {what}")


def _refusals(veil: VeilThread, bound: str) -> float:
    value = veil.registry.get_sample_value(
        "veil_actor_overload_refusals_total", {"service": "veil-session", "bound": bound}
    )
    return value or 0.0


def _assert_overloaded(status: int, headers: dict[str, str], body: Any) -> None:
    assert status == 503, body
    assert headers.get("Retry-After") == "1"
    assert body["error"]["code"] == "server_is_overloaded"
    assert body["error"]["type"] == "api_error"


def test_a_sessions_queue_is_bounded_and_the_admitted_turns_run_in_order(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    status, _, opened = _chat(veil, "hello")
    assert status == 200
    sid = opened["session_id"]
    sessions = veil.workers.sessions
    # Its reply leaves just before its actor counts it done.
    _wait_until(lambda: sessions.in_flight == 0, "the first turn to finish")
    refused_before = _refusals(veil, "mailbox")
    gate = upstream.hold()
    threads: list[tuple[threading.Thread, list[Any]]] = []
    try:
        # One running turn, then QUEUED waiting behind it, sent one after the other.
        for n in range(QUEUED + 1):
            threads.append(_in_background(lambda n=n: _chat(veil, f"turn {n}", sid)))
            _wait_until(lambda n=n: sessions.in_flight == n + 1, f"turn {n} to be admitted")
        _wait_until(lambda: upstream.pending() == 1, "the first turn to reach the upstream")
        for n in range(3):
            _assert_overloaded(*_chat(veil, f"refused {n}", sid))
        # Reads are not turns: served while the session's queue is full.
        status, _, view = _call(veil, "GET", f"/sessions/{sid}")
        assert status == 200 and view["turns"] == 1  # the running turn is not done yet
        assert _call(veil, "GET", f"/sessions/{sid}/messages")[0] == 200
        assert _call(veil, "GET", f"/sessions/{sid}/turns")[0] == 200
        assert upstream.pending() == 1, "all of the above answered while the turn ran"
    finally:
        gate.set()
    for thread, _ in threads:
        thread.join(PATIENCE)
    assert [out[0][0] for _, out in threads] == [200] * (QUEUED + 1)
    assert _refusals(veil, "mailbox") - refused_before == 3
    started = [e for e in veil.events(sid) if isinstance(e, TurnStarted)]
    texts = [[m.content for m in e.messages if m.role == "user"][-1] for e in started]
    assert texts == ["hello", *(f"turn {n}" for n in range(QUEUED + 1))]
    # The bound frees as turns finish.
    assert _chat(veil, "after", sid)[0] == 200


def test_the_workers_bound_refuses_new_turns_fast_and_still_serves_reads(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    status, _, opened = _chat(veil, "an existing session")
    assert status == 200
    sid = opened["session_id"]
    _wait_until(lambda: veil.workers.sessions.in_flight == 0, "the first turn to finish")
    refused_before = _refusals(veil, "in_flight")
    gate = upstream.hold(times=IN_FLIGHT)
    threads: list[tuple[threading.Thread, list[Any]]] = []
    try:
        for n in range(IN_FLIGHT):  # as many new sessions as the worker takes
            threads.append(_in_background(lambda n=n: _chat(veil, f"busy {n}")))
        _wait_until(lambda: upstream.pending() == IN_FLIGHT, "every turn to reach the upstream")
        # A new session, and a turn on an idle existing one: refused alike.
        _assert_overloaded(*_chat(veil, "one too many"))
        _assert_overloaded(*_chat(veil, "and another", sid))
        # The SDK sees a 503 with the header (max_retries=0: it does not try again).
        with _client(veil) as client:
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(
                    model="veil", messages=[{"role": "user", "content": "sdk"}]
                )
            assert info.value.status_code == 503
            assert info.value.response.headers["retry-after"] == "1"
            assert info.value.code == "server_is_overloaded"
            # A stream is refused before it starts: a 503, not an error event.
            with pytest.raises(openai.APIStatusError) as streamed:
                client.chat.completions.create(
                    model="veil", messages=[{"role": "user", "content": "sdk"}], stream=True
                )
            assert streamed.value.status_code == 503
            assert streamed.value.response.headers["retry-after"] == "1"
        # Reads are served while the worker is saturated.
        status, _, view = _call(veil, "GET", f"/sessions/{sid}")
        assert status == 200 and view["turns"] == 1
        assert _call(veil, "GET", f"/sessions/{sid}/messages")[0] == 200
        assert upstream.pending() == IN_FLIGHT
    finally:
        gate.set()
    for thread, _ in threads:
        thread.join(PATIENCE)
    assert [out[0][0] for _, out in threads] == [200] * IN_FLIGHT
    assert _refusals(veil, "in_flight") - refused_before == 4
    # The refused turn on the existing session left nothing in its log.
    started = [e for e in veil.events(sid) if isinstance(e, TurnStarted)]
    assert len(started) == 1
    assert _chat(veil, "room again", sid)[0] == 200


@pytest.mark.parametrize("field", ["max_queued_per_session", "max_turns_in_flight"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_the_bounds_are_checked_when_the_config_loads(
    tmp_path: Path, field: str, value: str
) -> None:
    path = tmp_path / "veil.toml"
    path.write_text(f"[server]\n{field} = {value}\n")
    with pytest.raises(ConfigError, match=rf"server\.{field}: must be at least 1"):
        load_config(path, env={})
    path.write_text(f"[server]\n{field} = 3\n")
    assert getattr(load_config(path, env={}).server, field) == 3
    path.write_text(f'[server]\n{field} = "many"\n')
    with pytest.raises(ConfigError, match=rf"server\.{field}"):
        load_config(path, env={})
