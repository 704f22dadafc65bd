"""The usage ledger's pure part (given events, then deltas) and its SQLite file."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec

from actors.usage.ledger import Delta, Ledger, Prices, RowKey
from actors.usage.projector import UsageProjector
from actors.usage.store import UsageStore
from bus.subjects import session_events
from contracts.usage import SpendQuery, UsageQuery
from eventstore.events import (
    ChatMessage,
    EventUnion,
    FactsExtracted,
    ModelCall,
    ModelCalled,
    PipelineChosen,
    ReplyCompleted,
    SessionOpened,
    TurnCancelled,
    TurnFailed,
    TurnStarted,
    Usage,
)
from eventstore.memory import InMemoryEventStore
from eventstore.upcast import EVENT_CODEC

T0 = datetime(2026, 5, 31, 23, 0, tzinfo=UTC)
DAY = date(2026, 5, 31)


def opened(key: str = "key_opener", user: str | None = "ann") -> SessionOpened:
    return SessionOpened(at=T0, session_id="s1", tenant="acme", key_id=key, user_id=user)


def started(
    turn: str = "t1",
    key: str | None = "key_asker",
    user: str | None = "bob",
    pipeline: str | None = "p",
) -> TurnStarted:
    return TurnStarted(
        at=T0,
        turn_id=turn,
        command_id=turn,
        model="veil",
        messages=[ChatMessage(role="user", content="hi")],
        lease_until=T0 + timedelta(minutes=10),
        pipeline=pipeline,
        key_id=key,
        user_id=user,
    )


def call(
    prompt: int | None, completion: int = 0, engine: str = "up", model: str = "m", **more: Any
) -> ModelCall:
    usage = None if prompt is None else Usage(prompt_tokens=prompt, completion_tokens=completion)
    return ModelCall(engine=engine, upstream_model=model, latency_ms=1.0, usage=usage, **more)


def reply(turn: str = "t1", made_by: ModelCall | None = None, at: datetime = T0) -> ReplyCompleted:
    return ReplyCompleted(
        at=at,
        turn_id=turn,
        content="hello",
        finish_reason="stop",
        usage=Usage(),
        call=made_by or call(10, 5),
    )


def row(
    key: str = "key_asker",
    user: str = "bob",
    pipeline: str = "p",
    engine: str = "up",
    model: str = "m",
    day: date = DAY,
) -> RowKey:
    return RowKey(day, "acme", key, user, "veil", pipeline, engine, model)


def run(events: list[EventUnion], prices: Prices | None = None) -> list[Delta]:
    ledger = Ledger(prices)
    return [d for e in events for d in ledger.apply("s1", e)]


def test_a_turn_bills_every_call_and_one_request_to_the_key_and_user_that_asked() -> None:
    failed = ModelCalled(at=T0, turn_id="t1", call=call(None, error="HTTP 500", status=500))
    deltas = run([opened(), started(), failed, reply()])
    assert deltas == [
        Delta(row(), prompt_tokens=0, completion_tokens=0),
        Delta(row(), prompt_tokens=10, completion_tokens=5),
        Delta(row(), requests=1),
    ]


def test_an_old_turn_without_key_or_user_bills_the_sessions_opener() -> None:
    deltas = run([opened(), started(key=None, user=None), reply()])
    assert {d.row for d in deltas} == {row(key="key_opener", user="ann")}


def test_a_turn_without_a_user_has_the_sessions_user_and_a_session_without_one_none() -> None:
    assert run([opened(), started(user=None), reply()])[0].row.user == "ann"
    assert run([opened(user=None), started(user=None), reply()])[0].row.user == ""


def test_the_chosen_pipeline_and_each_calls_engine_make_the_row() -> None:
    chosen = PipelineChosen(at=T0, turn_id="t1", pipeline="coder", means="semantic")
    summary = ModelCalled(at=T0, turn_id="t1", call=call(7, 3, engine="cheap", model="s"))
    deltas = run([opened(), started(pipeline=None), chosen, summary, reply()])
    assert [d.row for d in deltas] == [
        row(pipeline="coder", engine="cheap", model="s"),
        row(pipeline="coder"),
        row(pipeline="coder"),
    ]


def test_failed_and_cancelled_turns_count_one_request_at_their_last_call() -> None:
    failed = TurnFailed(at=T0, turn_id="t1", status=502, code="upstream_error", message="x")
    cut = ModelCalled(at=T0, turn_id="t2", call=call(4, 2, engine="other", model="o"))
    cancelled = TurnCancelled(at=T0, turn_id="t2", usage=Usage(prompt_tokens=4))
    deltas = run([opened(), started("t1"), failed, started("t2"), cut, cancelled])
    assert deltas == [
        # No call was made: the request has no engine.
        Delta(row(engine="", model=""), requests=1),
        Delta(row(engine="other", model="o"), prompt_tokens=4, completion_tokens=2),
        # The cancelled turn's usage is its call's, counted once.
        Delta(row(engine="other", model="o"), requests=1),
    ]


def test_facts_drawn_after_the_next_turn_started_are_billed_to_their_own_turn() -> None:
    events: list[EventUnion] = [
        opened(),
        started("t1", key="key_one"),
        reply("t1"),
        started("t2", key="key_two"),
        ModelCalled(at=T0, turn_id="t1", call=call(3, 1, purpose="facts")),
        FactsExtracted(at=T0, turn_id="t1", facts=["likes tea"]),
    ]
    assert run(events)[-1] == Delta(row(key="key_one"), prompt_tokens=3, completion_tokens=1)


def test_an_old_reply_without_its_call_counts_only_the_request() -> None:
    old = ReplyCompleted(
        at=T0, turn_id="t1", content="x", finish_reason="stop", usage=Usage(), call=None
    )
    made = ModelCalled(at=T0, turn_id="t1", call=call(10, 5))
    deltas = run([opened(), started(), made, old])
    assert [(d.requests, d.prompt_tokens) for d in deltas] == [(0, 10), (1, 0)]


def test_the_day_is_the_events_utc_day() -> None:
    late_in_tokyo = datetime(2026, 6, 1, 7, 30, tzinfo=timezone(timedelta(hours=9)))
    assert run([opened(), started(), reply(at=late_in_tokyo)])[-1].row.day == DAY
    assert run([opened(), started(), reply(at=T0 + timedelta(hours=1))])[-1].row.day == date(
        2026, 6, 1
    )


def test_cost_uses_the_engine_models_price_before_the_models_and_counts_nano_dollars() -> None:
    prices = Prices({"m": (1.0, 2.0), "gold/m": (100.0, 200.0)})
    plain = run([opened(), started(), reply(made_by=call(1000, 500))], prices)
    gold = run([opened(), started(), reply(made_by=call(1000, 500, engine="gold"))], prices)
    unpriced = run([opened(), started(), reply(made_by=call(1000, 500, model="free"))], prices)
    # 1000 * $1/M + 500 * $2/M = $0.002
    assert plain[0].cost_nusd == 2_000_000
    assert gold[0].cost_nusd == 200_000_000
    assert unpriced[0].cost_nusd == 0
    # A fraction of a nano-dollar rounds per call.
    assert (
        run([opened(), started(), reply(made_by=call(1, 0))], Prices({"m": (0.15, 0)}))[0].cost_nusd
        == 150
    )


def test_a_session_met_mid_log_counts_nothing_until_it_learns_its_start() -> None:
    ledger = Ledger()
    assert ledger.apply("s1", reply()) == [] and not ledger.knows("s1")
    ledger.learn("s1", [opened(), started()])
    assert ledger.knows("s1")
    assert [d.row for d in ledger.apply("s1", reply())] == [row(), row()]


# -- the file -----------------------------------------------------------------------------


def d(key: str, day: date, requests: int = 0, prompt: int = 0, nusd: int = 0) -> Delta:
    return Delta(row(key=key, day=day), requests, prompt, 1, nusd)


async def test_a_batch_at_or_before_the_checkpoint_is_not_counted_again(tmp_path: Path) -> None:
    store = await UsageStore.open(tmp_path / "usage.db")
    try:
        batch = [d("k1", DAY, 1, 10, 5), d("k1", DAY, 0, 20, 5)]
        assert await store.add(batch, checkpoint=7)
        assert not await store.add(batch, checkpoint=7)
        assert not await store.add(batch, checkpoint=3)
        assert await store.checkpoint() == 7
        rows = await store.dump()
        assert len(rows) == 1 and rows[0][-4:] == (1, 30, 2, 10)
    finally:
        await store.close()


async def test_reports_group_filter_and_sum(tmp_path: Path) -> None:
    store = await UsageStore.open(tmp_path / "usage.db")
    other_day = date(2026, 6, 1)
    try:
        await store.add(
            [
                d("k1", DAY, 1, 10, 1_500_000_000),
                d("k2", DAY, 2, 20),
                d("k1", other_day, 4, 40),
            ],
            checkpoint=1,
        )
        by_key = await store.report(UsageQuery(tenant="acme", group_by=("key",)))
        assert [(r.key_id, r.requests, r.prompt_tokens, r.day) for r in by_key.rows] == [
            ("k1", 5, 50, None),
            ("k2", 2, 20, None),
        ]
        assert by_key.rows[0].cost_usd == 1.5 and by_key.applied_seq == 1
        by_day = await store.report(UsageQuery(group_by=("day", "user"), since=other_day))
        assert [(r.day, r.user, r.requests) for r in by_day.rows] == [(other_day, "bob", 4)]
        assert (await store.report(UsageQuery(tenant="other"))).rows == []
        total = await store.report(UsageQuery(key_id="k2"))
        assert [(r.requests, r.completion_tokens) for r in total.rows] == [(2, 1)]
        limited = await store.report(UsageQuery(group_by=("key", "day"), limit=2))
        assert len(limited.rows) == 2 and limited.truncated
        spent = await store.spend(SpendQuery(tenant="acme", key_id="k1", since=other_day))
        assert (spent.tokens, spent.cost_usd) == (41, 0.0)
        everything = await store.spend(SpendQuery(tenant="acme"))
        assert (everything.tokens, everything.cost_usd) == (73, 1.5)
    finally:
        await store.close()


async def test_a_replayed_stretch_of_the_log_counts_only_what_is_new(tmp_path: Path) -> None:
    """Batches that overlap what the ledger holds (a redelivery, a restart) add only the
    events past its position; a projection resuming mid-session reads the session's start."""
    events: list[EventUnion] = [opened(), started(), reply(), started("t2"), reply("t2")]
    log = InMemoryEventStore()
    await log.append("acme", "s1", events, expected_last_seq=0)
    items = [
        (session_events("acme", "s1"), stored.seq, EVENT_CODEC.encode(stored.event))
        for stored in await log.load("acme", "s1")
    ]
    once = await UsageStore.open(tmp_path / "once.db")
    twice = await UsageStore.open(tmp_path / "twice.db")
    try:
        await UsageProjector(once, log, Prices()).apply(items)
        assert await UsageProjector(twice, log, Prices()).apply(items[:3]) == 2
        # A fresh projection (a restart) replays from the start: only events 4 and 5 count.
        assert await UsageProjector(twice, log, Prices()).apply(items) == 2
        assert await UsageProjector(twice, log, Prices()).apply(items) == 0
        assert await twice.dump() == await once.dump()
        assert [row[-4:-1] for row in await once.dump()] == [(2, 20, 10)]
    finally:
        await once.close()
        await twice.close()


def test_a_turn_started_of_an_older_log_reads_without_key_or_user() -> None:
    record = msgspec.json.decode(EVENT_CODEC.encode(started()))
    del record["key_id"], record["user_id"]
    old = EVENT_CODEC.decode(msgspec.json.encode(record))
    assert isinstance(old, TurnStarted) and (old.key_id, old.user_id) == (None, None)
