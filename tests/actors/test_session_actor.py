"""The session actor's shell when the log is out of reach."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client

from actors.leases import Leases
from actors.session_actor import SessionActor, SessionContext
from actors.session_front import SessionFront
from actors.state_digest import state_digest
from bus.runtime import Envelope
from bus.signals import Signals
from bus.subjects import SESSION_CANCEL_WILDCARD, session_key
from config import Config, EngineConfig, ModelConfig, PipelineConfig
from contracts.session import (
    SESSION_COMMAND_CODEC,
    TURN_REPLY_CODEC,
    GetSession,
    StartTurn,
    TurnAccepted,
    TurnRejected,
)
from eventstore.errors import StoreUnavailable
from eventstore.events import ChatMessage, EventUnion, SessionOpened, TurnFailed, TurnStarted
from eventstore.jetstream import JetStreamEventStore, ensure_stream
from eventstore.memory import InMemoryEventStore
from eventstore.store import Appended
from veil.replay import replay_digest


class _Unreachable(InMemoryEventStore):
    """A store whose appends fail as JetStream's do while the bus is down."""

    down = True
    failure: Exception = StoreUnavailable("append: nats: connection reconnecting")

    async def append(
        self,
        tenant: str,
        session_id: str,
        events: Sequence[EventUnion],
        *,
        expected_last_seq: int,
        dedupe_id: str | None = None,
    ) -> Appended:
        if self.down:
            raise self.failure
        return await super().append(
            tenant, session_id, events, expected_last_seq=expected_last_seq, dedupe_id=dedupe_id
        )


class _Request:
    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.headers: dict[str, str] = {}  # a request of the bus carries none here
        self.subject = "chat.session.t.s1.cmd"

    async def respond(self, data: bytes) -> None:
        self.replies.append(data)

    async def respond_error(self, code: str, description: str) -> None:
        raise AssertionError(f"the actor failed: {code} {description}")


@pytest.mark.parametrize(
    "failure",
    [
        StoreUnavailable("append: nats: connection reconnecting"),
        # What a model call or any other request on the bus raises meanwhile.
        nats.errors.ConnectionReconnectingError(),
        nats.errors.ConnectionClosedError(),
    ],
)
async def test_a_log_out_of_reach_is_a_503_to_retry_not_an_actor_failure(
    nc: Client, failure: Exception
) -> None:
    store = _Unreachable()
    store.failure = failure
    config = Config(
        engines={"up": EngineConfig(kind="openai", base_url="http://127.0.0.1:9/v1")},
        pipelines={"p": PipelineConfig(engine="up", model="m")},
        models=[ModelConfig(name="veil", pipeline="p")],
    )
    ctx = SessionContext(
        nc=nc,
        store=store,
        config=config,
        signals=Signals(nc, SESSION_CANCEL_WILDCARD),
        leases=Leases(nc),
    )
    actor = SessionActor(session_key("t", "s1"), ctx)
    start = StartTurn(
        command_id="c1",
        turn_id="t1",
        session_id="s1",
        new_session=True,
        tenant="t",
        key_id="k",
        model="veil",
        messages=[ChatMessage(role="user", content="hi")],
    )
    request: Any = _Request()
    await actor.receive(Envelope(request, start))
    reply = TURN_REPLY_CODEC.decode(request.replies[-1])
    assert isinstance(reply, TurnRejected) and reply.error.status == 503
    assert reply.error.code == "service_unavailable"
    assert await store.load("t", "s1") == []
    assert not actor.owned_by("t"), "it reads the log again before trusting its state"


class _Unreadable(InMemoryEventStore):
    """A store that cannot be read, as while a cluster elects the log's new leader."""

    async def first(self, tenant: str, session_id: str) -> Any:
        raise StoreUnavailable("direct get on CHAT_EVENTS: NoRespondersError()")


async def test_a_log_the_front_cannot_read_is_a_503_not_an_actor_failure(nc: Client) -> None:
    ctx = SessionContext(
        nc=nc,
        store=_Unreadable(),
        config=Config(),
        signals=Signals(nc, SESSION_CANCEL_WILDCARD),
        leases=Leases(nc),
    )
    front = SessionFront(ctx)
    key = session_key("t", "s1")
    request: Any = _Request()
    request.data = SESSION_COMMAND_CODEC.encode(GetSession(session_id="s1", tenant="t"))
    work = front.screen(key, request, None)
    assert not isinstance(work, Envelope), "a read of a session without an actor reads the log"
    await work
    reply = TURN_REPLY_CODEC.decode(request.replies[-1])
    assert isinstance(reply, TurnRejected) and reply.error.status == 503
    assert reply.error.code == "service_unavailable"


class _LostAck(JetStreamEventStore):
    """The real log, whose first acknowledgement is lost: stored, then reported down."""

    lose = True

    async def append(
        self,
        tenant: str,
        session_id: str,
        events: Sequence[EventUnion],
        *,
        expected_last_seq: int,
        dedupe_id: str | None = None,
    ) -> Appended:
        appended = await super().append(
            tenant, session_id, events, expected_last_seq=expected_last_seq, dedupe_id=dedupe_id
        )
        if self.lose:
            self.lose = False
            raise StoreUnavailable("append: nats: timeout")
        return appended


@pytest.mark.parametrize("first_try", ["same worker", "another worker", "another, running"])
async def test_a_retry_after_a_lost_acknowledgement_folds_what_the_log_kept(
    nc: Client, first_try: str
) -> None:
    """The retry decides again with a later clock; the log keeps the first try's events,
    and the actor must hold what a replay of the log rebuilds. A start the first try
    stored on another worker names that worker: while that worker runs the turn the
    retry waits on it, else it closes that start and runs the turn under its own name."""
    js = nc.jetstream()
    await ensure_stream(js)
    store = _LostAck(js, nc)
    ticks = iter(range(1_000))
    config = Config(
        engines={"up": EngineConfig(kind="openai", base_url="http://127.0.0.1:9/v1")},
        pipelines={"p": PipelineConfig(engine="up", model="m")},
        models=[ModelConfig(name="veil", pipeline="p")],
    )

    def context() -> SessionContext:
        return SessionContext(
            nc=nc,
            store=store,
            config=config,
            signals=Signals(nc, SESSION_CANCEL_WILDCARD),
            leases=Leases(nc),
            clock=lambda: datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=next(ticks)),
        )

    here = context()
    there = here if first_try == "same worker" else context()
    sid = f"s{uuid.uuid4().hex}"
    start = StartTurn(
        command_id="c1",
        turn_id="t1",
        session_id=sid,
        new_session=True,
        tenant="t",
        key_id="k",
        model="veil",
        messages=[ChatMessage(role="user", content="hi")],
        stream=True,  # its session stays when the turn fails (no model worker here)
    )
    # The retry reaches an actor that read the log before the first try.
    actor = SessionActor(session_key("t", sid), here)
    await actor._reload()
    first: Any = _Request()
    await SessionActor(session_key("t", sid), there).receive(Envelope(first, start))
    refused = TURN_REPLY_CODEC.decode(first.replies[-1])
    assert isinstance(refused, TurnRejected) and refused.error.status == 503
    kept = await store.load("t", sid)
    assert [type(s.event) for s in kept] == [SessionOpened, TurnStarted]

    retry: Any = _Request()
    if first_try == "another, running":
        await there.leases.start()
        try:
            with there.leases.holding(start.turn_id):
                await actor.receive(Envelope(retry, start))
        finally:
            await there.leases.stop()
    else:
        await actor.receive(Envelope(retry, start))
    stored = await store.load("t", sid)
    assert stored[: len(kept)] == kept, "nothing of the first try is stored twice or lost"
    state, seq = actor.snapshot()
    assert seq == stored[-1].seq
    assert state_digest(state) == replay_digest(stored)
    starts = [s.event for s in stored if isinstance(s.event, TurnStarted)]
    closed = [s.event.code for s in stored if isinstance(s.event, TurnFailed)]
    if first_try == "same worker":
        assert len(starts) == 1 and starts[0].holder == here.leases.worker_id
    elif first_try == "another worker":
        assert len(starts) == 2 and closed[0] == "worker_lost"
        assert starts[-1].holder == here.leases.worker_id
    else:
        assert stored == kept, "the running turn is not started twice"
        accepted = TURN_REPLY_CODEC.decode(retry.replies[0])
        assert isinstance(accepted, TurnAccepted) and accepted.replay
        assert accepted.holder == there.leases.worker_id
