"""Nothing waits on a turn it does not need, and nothing runs for a client that left.

Reads and refusals answer while a turn runs; a probed id costs no actor; a request
whose client gave up while queued never starts; a lease whose holder is gone frees
the session at once; while the bus is down, requests fail fast. The upstream holds
its answer until the test lets it go, so "while a turn runs" is a fact, not a timing.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import openai
import pytest
from nats.aio.msg import Msg

from actors.leases import Leases
from bus.subjects import session_cancel
from config import (
    ApiKey,
    Config,
    EngineConfig,
    MemoryConfig,
    ModelConfig,
    PipelineConfig,
    ServerConfig,
)
from eventstore.events import ChatMessage, TurnFailed, TurnStarted
from eventstore.jetstream import JetStreamEventStore
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread
from veil.natsserver import NatsServer

KEY_A, KEY_B = "sk-liveness-a", "sk-liveness-b"
# Hang detectors only: every wait below ends on an event long before these.
PATIENCE = 30.0


def _config(upstream: FakeOpenAI, nats_url: str) -> Config:
    return Config(
        server=ServerConfig(turn_timeout=120, accept_timeout=120),
        keys=[ApiKey(key=KEY_A, tenant="tenant-a"), ApiKey(key=KEY_B, tenant="tenant-b")],
        engines={
            "up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x", timeout=120)
        },
        pipelines={"default": PipelineConfig(engine="up", model="m", retries=0)},
        models=[ModelConfig(name="veil", pipeline="default")],
        nats_url=nats_url,
        memory=MemoryConfig(enabled=False),
    )


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    # Its own server: no other module's workers can answer this module's commands.
    with NatsServer(tmp_path_factory.mktemp("liveness-nats")) as server:
        yield server


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def veil(own_nats: NatsServer, upstream: FakeOpenAI) -> Iterator[VeilThread]:
    with VeilThread(_config(upstream, own_nats.url), own_nats.url) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean(upstream: FakeOpenAI) -> None:
    upstream.reset()


def _client(veil: VeilThread, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=veil.base_url, api_key=key, max_retries=0, timeout=PATIENCE)


def _new_session(veil: VeilThread) -> str:
    with _client(veil) as client:
        reply = client.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": "hello"}]
        )
    return str(reply.model_extra["session_id"])


def _call(
    veil: VeilThread, method: str, path: str, key: str = KEY_A, body: Any = None
) -> tuple[int, Any]:
    """One plain HTTP call; the status and the decoded JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", veil.port, timeout=PATIENCE)
    try:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, f"/v1{path}", body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def _chat(veil: VeilThread, sid: str, text: str, key: str = KEY_A) -> tuple[int, Any]:
    body = {"model": "veil", "messages": [{"role": "user", "content": text}], "session_id": sid}
    return _call(veil, "POST", "/chat/completions", key, body)


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


def _turns_started(veil: VeilThread, sid: str) -> list[TurnStarted]:
    return [e for e in veil.events(sid) if isinstance(e, TurnStarted)]


def test_reads_and_other_tenants_answer_while_a_turn_runs(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    sid = _new_session(veil)
    gate = upstream.hold()
    try:
        running, result = _in_background(lambda: _chat(veil, sid, "take your time"))
        _wait_until(lambda: upstream.pending() == 1, "the turn to reach the upstream")
        status, view = _call(veil, "GET", f"/sessions/{sid}")
        assert status == 200 and view["turns"] == 1
        status, listed = _call(veil, "GET", f"/sessions/{sid}/messages")
        assert status == 200 and [m["role"] for m in listed["data"]] == ["user", "assistant"]
        # Another tenant's probes: the same 404 as a free id, without waiting for the turn.
        for method, path, body in (
            ("GET", f"/sessions/{sid}", None),
            ("GET", f"/sessions/{sid}/messages", None),
            ("DELETE", f"/sessions/{sid}", None),
        ):
            assert _call(veil, method, path, KEY_B, body)[0] == 404
        # A turn of another tenant on the same name is its own session: it runs at once,
        # beside the first tenant's turn, not behind it.
        assert _chat(veil, sid, "mine too", KEY_B)[0] == 200
        assert upstream.pending() == 1, "everything above answered while the turn was running"
    finally:
        gate.set()
    running.join(PATIENCE)
    assert result[0][0] == 200
    assert _call(veil, "GET", f"/sessions/{sid}")[1]["turns"] == 2
    assert _call(veil, "GET", f"/sessions/{sid}", KEY_B)[1]["turns"] == 1


def test_probed_ids_cost_no_actor(veil: VeilThread) -> None:
    # (A turn on a free name opens a session under it: that one has an actor by design.)
    sid = _new_session(veil)
    active = veil.workers.sessions.active
    for _ in range(40):
        free = f"sess_{uuid.uuid4().hex}"
        assert _call(veil, "GET", f"/sessions/{free}")[0] == 404
        assert _call(veil, "GET", f"/sessions/{free}/messages")[0] == 404
        assert _call(veil, "DELETE", f"/sessions/{free}")[0] == 404
    for _ in range(10):  # another tenant's live session
        assert _call(veil, "GET", f"/sessions/{sid}", KEY_B)[0] == 404
        assert _call(veil, "DELETE", f"/sessions/{sid}", KEY_B)[0] == 404
    assert veil.workers.sessions.active == active


def _idempotent_turn_id(tenant: str, key: str) -> str:
    return "idem_" + hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()[:32]


def _post_and_hang_up(veil: VeilThread, sid: str, idempotency_key: str) -> None:
    """Send a non-streaming turn, then drop the connection without reading the answer."""
    body = json.dumps(
        {"model": "veil", "messages": [{"role": "user", "content": "too late"}], "session_id": sid}
    ).encode()
    with socket.create_connection(("127.0.0.1", veil.port), timeout=PATIENCE) as sock:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {KEY_A}\r\nContent-Type: application/json\r\n"
            f"Idempotency-Key: {idempotency_key}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)


def test_a_request_whose_client_left_while_queued_never_runs(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    sid = _new_session(veil)
    gate = upstream.hold()
    try:
        first, first_result = _in_background(lambda: _chat(veil, sid, "the long one"))
        _wait_until(lambda: upstream.pending() == 1, "the first turn to reach the upstream")
        key = uuid.uuid4().hex
        _post_and_hang_up(veil, sid, key)
        signals = veil.workers.signals
        assert signals is not None
        cancel = session_cancel("tenant-a", sid, _idempotent_turn_id("tenant-a", key))
        _wait_until(lambda: signals.fired(cancel), "the gateway to cancel the abandoned turn")
    finally:
        gate.set()
    first.join(PATIENCE)
    assert first_result[0][0] == 200
    # Queued behind the abandoned one: when this answers, the abandoned one was handled.
    assert _chat(veil, sid, "and now")[0] == 200
    texts = [m.content for t in _turns_started(veil, sid) for m in t.messages]
    assert texts == ["hello", "the long one", "and now"]
    assert len(upstream.requests) == 3
    assert not any("too late" in json.dumps(r.body) for r in upstream.requests)
    # The client's retry under the same Idempotency-Key is a request somebody waits for.
    body = {
        "model": "veil",
        "messages": [{"role": "user", "content": "too late"}],
        "session_id": sid,
    }
    conn = http.client.HTTPConnection("127.0.0.1", veil.port, timeout=PATIENCE)
    headers = {
        "Authorization": f"Bearer {KEY_A}",
        "Content-Type": "application/json",
        "Idempotency-Key": key,
    }
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers=headers)
    assert conn.getresponse().status == 200
    conn.close()
    assert "too late" in json.dumps(upstream.last_request.body)


async def _append_open_turn(veil: VeilThread, sid: str, turn_id: str, holder: str) -> None:
    """A turn left open in the log, as a worker that took it leaves it."""
    nc = await nats.connect(veil.nats_url)
    try:
        store = JetStreamEventStore(nc.jetstream(), nc)
        now = datetime.now(UTC)
        started = TurnStarted(
            at=now,
            turn_id=turn_id,
            command_id=turn_id,
            model="veil",
            messages=[ChatMessage(role="user", content="orphaned")],
            lease_until=now + timedelta(hours=1),
            holder=holder,
        )
        last = await store.last_seq("tenant-a", sid)
        await store.append("tenant-a", sid, [started], expected_last_seq=last)
    finally:
        await nc.close()


def test_a_lease_whose_holder_is_gone_frees_the_session_at_once(veil: VeilThread) -> None:
    sid = _new_session(veil)
    # A worker that died mid-turn: its id answers nothing on the bus.
    veil.call(_append_open_turn(veil, sid, "t-orphan", holder=f"w_{uuid.uuid4().hex[:16]}"))
    status, reply = _chat(veil, sid, "anyone there?")  # the lease has an hour to run
    assert status == 200, reply
    events = veil.events(sid)
    failed = [e for e in events if isinstance(e, TurnFailed)]
    assert [(f.turn_id, f.code) for f in failed] == [("t-orphan", "worker_lost")]
    assert events.index(failed[0]) < events.index(_turns_started(veil, sid)[-1])
    assert _call(veil, "GET", f"/sessions/{sid}")[1]["turns"] == 3


class _CountingLeases(Leases):
    """A live holder that counts how often it is asked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked = 0

    async def _answer(self, msg: Msg) -> None:
        self.asked += 1
        await super()._answer(msg)


def test_a_live_holder_keeps_its_session_until_it_goes(veil: VeilThread) -> None:
    sid = _new_session(veil)

    async def start_holder() -> tuple[_CountingLeases, Any]:
        nc = await nats.connect(veil.nats_url)
        leases = _CountingLeases(nc)
        await leases.start()
        return leases, nc

    leases, nc = veil.call(start_holder())
    with leases.holding("t-alive"):
        veil.call(_append_open_turn(veil, sid, "t-alive", holder=leases.worker_id))
        waiting, result = _in_background(lambda: _chat(veil, sid, "after you"))
        # Asked, told "still running", asked again a probe later: it waited, and keeps asking.
        _wait_until(lambda: leases.asked >= 2, "the waiting turn to ask the holder twice")
        assert not result, "the turn started while the holder still ran the session"
        veil.call(nc.close())  # the holder's process goes away
        waiting.join(PATIENCE)
    assert result and result[0][0] == 200
    failed = [e for e in veil.events(sid) if isinstance(e, TurnFailed)]
    assert [(f.turn_id, f.code) for f in failed] == [("t-alive", "worker_lost")]


def test_requests_fail_fast_while_the_bus_is_down_and_recover(
    upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = NatsServer(tmp_path_factory.mktemp("down-nats"))
    server.start()
    try:
        with VeilThread(_config(upstream, server.url), server.url) as veil:
            sid = _new_session(veil)
            server.stop()
            _wait_until(lambda: _call_health(veil) == 503, "the gateway to see the bus down")
            status, body = _chat(veil, sid, "are you there?")
            assert status == 503 and body["error"]["code"] == "service_unavailable"
            assert _call(veil, "GET", f"/sessions/{sid}")[0] == 503
            veil.call(server.arestart())
            _wait_until(lambda: _call_health(veil) == 200, "the gateway to reconnect")
            _wait_until(lambda: _chat(veil, sid, "back?")[0] == 200, "turns to work again")
            assert _call(veil, "GET", f"/sessions/{sid}")[1]["turns"] >= 2
    finally:
        server.stop()


def _call_health(veil: VeilThread) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", veil.port, timeout=PATIENCE)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    finally:
        conn.close()
