"""Usage accounting and budgets: the ledger projected from the log, /v1/usage and its
scopes, budgets refusing with OpenAI's insufficient_quota, and `veil usage`."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import threading
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import nats
import openai
import pytest

from actors.usage.projector import UsageProjector, prices_of
from actors.usage.store import UsageStore
from bus.requests import nats_request
from bus.stream_reader import StreamReader
from bus.subjects import EVENTS_WILDCARD, USAGE_QUERY, USAGE_SPEND
from config import ApiKey, Config, EngineConfig, MemoryConfig, ModelConfig, PipelineConfig
from config.schema import PriceConfig, TenantConfig, UsageConfig, key_id
from contracts.keys import Quota
from contracts.usage import USAGE_QUERY_CODEC, USAGE_REPORT_CODEC, UsageQuery
from edge.budgets import estimate_tokens, period_start
from edge.openai_wire import parse_chat_request
from eventstore.events import (
    ModelCalled,
    ReplyCompleted,
    TurnCancelled,
    TurnFailed,
    TurnStarted,
    model_calls,
)
from eventstore.jetstream import JetStreamEventStore
from testkit.procs import nats_server, run_veil
from testkit.upstreams import FakeOpenAI, Fault
from tests.harness import VeilThread, hang_up_mid_stream
from tests.test_gateway import http
from tests.test_keys import eventually
from veil.usage_role import ledger_path, lock_ledger

ADMIN = "sk-usage-admin"
A1, A2, AUDIT_A, B1 = "sk-acme-1", "sk-acme-2", "sk-acme-audit", "sk-beta-1"
STREAM, FAULTS = "sk-stream", "sk-faults"
TIGHT, TIGHT_FREE = "sk-tight", "sk-tight-free"
SHARED_1, SHARED_2 = "sk-shared-1", "sk-shared-2"
USD = "sk-usd"
OPENER, SECOND = "sk-relay-1", "sk-relay-2"
# USD per million tokens: a word costs a thousandth of a dollar, its echo two.
PRICES = {"m": PriceConfig(prompt=1000.0, completion=2000.0)}
# Eight words: the fake counts 8 prompt tokens and echoes 9 (17 in all); Veil estimates 9.
EIGHT = "one two three four five six seven eight"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _config(nats_url: str, upstream: FakeOpenAI, keys: list[ApiKey]) -> Config:
    return Config(
        keys=keys,
        tenants={"shared": TenantConfig(budget_tokens=20)},
        engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
        pipelines={"p": PipelineConfig(engine="up", model="m", retries=0)},
        models=[ModelConfig(name="veil", pipeline="p")],
        prices=dict(PRICES),
        nats_url=nats_url,
        memory=MemoryConfig(enabled=False),
    )


@pytest.fixture(scope="module")
def veil(nats_url: str, upstream: FakeOpenAI) -> Iterator[VeilThread]:
    keys = [
        ApiKey(key=ADMIN, tenant="ops", admin=True),
        ApiKey(key=A1, tenant="acme"),
        ApiKey(key=A2, tenant="acme"),
        ApiKey(key=AUDIT_A, tenant="acme", scopes=["audit"]),
        ApiKey(key=B1, tenant="beta"),
        ApiKey(key=STREAM, tenant="stream"),
        ApiKey(key=FAULTS, tenant="faults"),
        ApiKey(key=TIGHT, tenant="tight", budget_tokens=20),
        ApiKey(key=TIGHT_FREE, tenant="tight"),
        ApiKey(key=SHARED_1, tenant="shared"),
        ApiKey(key=SHARED_2, tenant="shared"),
        ApiKey(key=USD, tenant="usd", budget_usd=0.01, budget_period="total"),
        ApiKey(key=OPENER, tenant="relay"),
        ApiKey(key=SECOND, tenant="relay"),
    ]
    with VeilThread(_config(nats_url, upstream, keys), nats_url) as server:
        yield server


def client(veil: VeilThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=veil.base_url, api_key=key, max_retries=0)


def chat(veil: VeilThread, key: str, text: str = EIGHT, **more: Any) -> str:
    """A turn; its session id."""
    with client(veil, key) as c:
        reply = c.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": text}], **more
        )
    return str(reply.model_extra["session_id"])  # type: ignore[index]


def usage(veil: VeilThread, key: str, query: str) -> tuple[int, dict[str, Any]]:
    reply = http("GET", f"{veil.base_url}/usage?{query}", None, {"Authorization": f"Bearer {key}"})
    return reply.status_code, reply.json()


def report(veil: VeilThread, key: str, query: str) -> dict[str, Any]:
    status, body = usage(veil, key, query)
    assert status == 200, body
    return body


def results(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for bucket in body["data"] for r in bucket["results"]]


def settle(veil: VeilThread) -> None:
    """Wait until the ledger has applied everything in the log."""

    async def caught_up() -> None:
        nc = veil.workers.nc
        last = (await nc.jetstream().stream_info("CHAT_EVENTS")).state.last_seq
        ask = USAGE_QUERY_CODEC.encode(UsageQuery(limit=1))
        while True:
            reply = await nats_request(nc, USAGE_QUERY, ask, timeout=5)
            if USAGE_REPORT_CODEC.decode(reply.data).applied_seq >= last:
                return
            await asyncio.sleep(0.02)

    veil.call(caught_up())


def logged_tokens(veil: VeilThread, *sessions: str) -> tuple[int, int]:
    """Prompt and completion tokens of every model call these sessions' logs hold."""
    prompt = completion = 0
    for sid in sessions:
        for call in model_calls(veil.events(sid)):
            if call.usage is not None:
                prompt += call.usage.prompt_tokens
                completion += call.usage.completion_tokens
    return prompt, completion


def test_rows_per_grouping_and_their_cost(veil: VeilThread) -> None:
    first = chat(veil, A1)
    chat(veil, A1, "and again", metadata={"session_id": first})
    other = chat(veil, A2, user="carol")
    settle(veil)
    status, body = usage(veil, ADMIN, "tenant=acme&group_by=key")
    assert status == 200 and body["object"] == "page" and body["has_more"] is False
    assert len(body["data"]) == 1 and body["data"][0]["object"] == "bucket"
    by_key = {r["api_key_id"]: r for r in results(body)}
    assert set(by_key) == {key_id(A1), key_id(A2)}
    for key, sessions, turns in ((A1, [first], 2), (A2, [other], 1)):
        row = by_key[key_id(key)]
        prompt, completion = logged_tokens(veil, *sessions)
        assert prompt > 0 and completion > 0
        assert (row["input_tokens"], row["output_tokens"]) == (prompt, completion)
        assert row["num_model_requests"] == turns
        assert row["object"] == "organization.usage.completions.result"
        # [prices.m]: $1000 and $2000 per million tokens.
        assert row["cost_usd"] == pytest.approx((prompt * 1000 + completion * 2000) / 1e6)
        assert row["model"] is None and row["user_id"] is None and row["project_id"] is None
    status, body = usage(veil, ADMIN, "tenant=acme&group_by=user,model,pipeline,upstream_model")
    by_user = {r["user_id"]: r for r in results(body)}
    assert set(by_user) == {None, "carol"}
    assert by_user["carol"]["num_model_requests"] == 1
    assert {(r["model"], r["pipeline"], r["upstream_model"]) for r in by_user.values()} == {
        ("veil", "p", "m")
    }
    status, body = usage(veil, ADMIN, "group_by=tenant,day")
    assert status == 200
    days = [b for b in body["data"] if b["results"]]
    assert len(days) == 1 and days[0]["end_time"] - days[0]["start_time"] == 86400
    assert "acme" in {r["project_id"] for r in days[0]["results"]}


def test_a_turn_is_billed_to_the_key_and_user_that_asked_for_it(veil: VeilThread) -> None:
    sid = chat(veil, OPENER, user="ann")
    chat(veil, SECOND, "me too", metadata={"session_id": sid}, user="bob")
    second = [e for e in veil.events(sid) if isinstance(e, TurnStarted)][-1]
    assert (second.key_id, second.user_id) == (key_id(SECOND), "bob")
    settle(veil)
    body = report(veil, ADMIN, "tenant=relay&group_by=key,user")
    assert {(r["api_key_id"], r["user_id"], r["num_model_requests"]) for r in results(body)} == {
        (key_id(OPENER), "ann", 1),
        (key_id(SECOND), "bob", 1),
    }


def test_a_streamed_turn_is_billed_with_the_upstreams_counts(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    # Three long words: the fake counts 3 prompt tokens and echoes 4; a text estimate
    # (Veil's own, for an upstream that reports nothing) would be about 75.
    text = " ".join(w * 100 for w in "xyz")
    with client(veil, STREAM) as c:
        stream = c.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": text}], stream=True
        )
        chunks = list(stream)
    assert all(chunk.usage is None for chunk in chunks)  # the client did not ask for it
    assert upstream.last_request.body["stream_options"] == {"include_usage": True}
    sid = chunks[0].model_extra["session_id"]  # type: ignore[index]
    reply = next(e for e in veil.events(sid) if isinstance(e, ReplyCompleted))
    assert reply.call is not None and not reply.call.usage_estimated
    settle(veil)
    body = report(veil, ADMIN, "tenant=stream")
    [row] = results(body)
    assert (row["input_tokens"], row["output_tokens"], row["num_model_requests"]) == (3, 4, 1)


def test_failed_and_cancelled_turns_are_counted(veil: VeilThread, upstream: FakeOpenAI) -> None:
    sid = chat(veil, FAULTS)
    upstream.fail_next(500)
    with pytest.raises(openai.APIStatusError) as failed:
        chat(veil, FAULTS, "fail now", metadata={"session_id": sid})
    assert failed.value.status_code == 502
    upstream.inject(Fault(token_delay=0.05))
    cut = veil.call(hang_up_mid_stream(veil.base_url, FAULTS))
    eventually(lambda: any(isinstance(e, TurnCancelled) for e in veil.events(cut)))
    assert any(isinstance(e, TurnFailed) for e in veil.events(sid))
    # The cut call recorded what it produced: some tokens, counted once.
    cut_calls = [e for e in veil.events(cut) if isinstance(e, ModelCalled)]
    assert cut_calls and cut_calls[0].call.usage is not None
    settle(veil)
    body = report(veil, ADMIN, "tenant=faults")
    [row] = results(body)
    assert row["num_model_requests"] == 3  # answered, failed, cancelled
    assert (row["input_tokens"], row["output_tokens"]) == logged_tokens(veil, sid, cut)


def test_a_rebuild_gives_identical_rows_and_a_replay_counts_nothing_twice(
    veil: VeilThread, tmp_path: Path
) -> None:
    chat(veil, B1)
    settle(veil)

    async def dump(path: Path) -> list[tuple[Any, ...]]:
        store = await UsageStore.open(path)
        try:
            return await store.dump()
        finally:
            await store.close()

    live = veil.call(dump(ledger_path(veil.config)))
    assert live
    (tmp_path / "veil.toml").write_text("[prices.m]\nprompt = 1000.0\ncompletion = 2000.0\n")
    env = {
        "VEIL_NATS_URL": veil.nats_url,
        "VEIL_DATA_DIR": str(tmp_path),
        "VEIL_CONFIG": str(tmp_path / "veil.toml"),
    }
    rebuilt = run_veil("usage", "--rebuild", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"{len(live)} rows" in rebuilt.stdout
    assert veil.call(dump(tmp_path / "usage.db")) == live

    async def replay(path: Path) -> int:
        """Feed the whole log again to a fresh projection on the rebuilt ledger."""
        nc = await nats.connect(veil.nats_url)
        store = await UsageStore.open(path)
        try:
            js = nc.jetstream()
            last = (await js.stream_info("CHAT_EVENTS")).state.last_seq
            projector = UsageProjector(store, JetStreamEventStore(js, nc), prices_of(veil.config))
            added = seen = 0
            async with StreamReader(js, EVENTS_WILDCARD, batch=64, wait=0) as reader:
                while seen < last:
                    batch = await reader.next_batch(timeout=5)
                    assert batch, "the log ended early"
                    added += await projector.apply_messages(batch)
                    seen = batch[-1].metadata.sequence.stream
            return added
        finally:
            await store.close()
            await nc.close()

    assert veil.call(replay(tmp_path / "usage.db")) == 0
    assert veil.call(dump(tmp_path / "usage.db")) == live


def test_who_sees_what(veil: VeilThread) -> None:
    chat(veil, A1)
    chat(veil, A2)
    chat(veil, B1)
    settle(veil)

    def keys_seen(key: str, query: str = "") -> set[str]:
        status, body = usage(veil, key, f"group_by=key,tenant&{query}")
        assert status == 200, body
        return {f"{r['project_id']}/{r['api_key_id']}" for r in results(body)}

    a1, a2, b1 = (f"{t}/{key_id(k)}" for t, k in (("acme", A1), ("acme", A2), ("beta", B1)))
    assert keys_seen(A1) == {a1}  # a chat key: its own key only
    assert keys_seen(A1, f"key_id={key_id(A1)}&tenant=acme") == {a1}
    assert keys_seen(AUDIT_A) == {a1, a2}  # audit: its tenant
    assert keys_seen(AUDIT_A, f"key_id={key_id(A2)}") == {a2}
    assert keys_seen(AUDIT_A, f"key_id={key_id(B1)}") == set()
    assert {a1, a2, b1} <= keys_seen(ADMIN)  # admin: every tenant
    assert keys_seen(ADMIN, "tenant=beta") == {b1}
    for key, query, param in (
        (A1, f"key_id={key_id(A2)}", "key_id"),  # a chat key asks for another key's
        (A1, "tenant=beta", "tenant"),
        (AUDIT_A, "tenant=beta", "tenant"),
    ):
        status, body = usage(veil, key, query)
        assert status == 403 and body["error"]["param"] == param, body
        assert body["error"]["type"] == "permission_error"


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("from=2026-13-01", "from"),
        ("from=yesterday", "from"),
        ("from=2026-02-30", "from"),
        ("to=2026-1-1", "to"),
        ("from=2026-03-02&to=2026-03-01", "from"),
        ("from=2024-01-01&to=2026-01-01", "from"),
        ("group_by=color", "group_by"),
        ("group_by=" + "model," * 60, "group_by"),
        ("tenant=a%20b", "tenant"),
        ("key_id=" + "k" * 300, "key_id"),
        ("user=", "user"),
    ],
)
def test_bad_parameters_are_400s_that_name_them(veil: VeilThread, query: str, param: str) -> None:
    status, body = usage(veil, ADMIN, query)
    assert status == 400 and body["error"]["param"] == param, body
    assert body["error"]["type"] == "invalid_request_error"


def _said(error: openai.APIStatusError) -> str:
    """The error's own message (the SDK's `message` wraps it)."""
    assert isinstance(error.body, dict)
    return str(error.body["message"])


def _refusal(veil: VeilThread, key: str) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as refused:
        chat(veil, key)
    return refused.value


def test_a_key_over_its_token_budget_gets_insufficient_quota(veil: VeilThread) -> None:
    # Nothing spent: 0 + 9 estimated <= 20.
    chat(veil, TIGHT)
    settle(veil)
    # 17 spent + 9 estimated > 20.
    error = _refusal(veil, TIGHT)
    assert error.status_code == 429
    assert error.code == "insufficient_quota" and error.type == "insufficient_quota"
    assert _said(error).startswith("You exceeded your current quota")
    # The budget is the key's: another key of the tenant goes on.
    chat(veil, TIGHT_FREE)


def test_a_tenant_budget_is_shared_by_its_keys(veil: VeilThread) -> None:
    chat(veil, SHARED_1)
    settle(veil)
    # The other key has spent nothing; the tenant's 17 + 9 > 20.
    error = _refusal(veil, SHARED_2)
    assert error.code == "insufficient_quota" and "tenant" in _said(error)


def test_a_usd_budget(veil: VeilThread) -> None:
    # $0 < $0.01: admitted; the turn costs 8 * $0.001 + 9 * $0.002.
    chat(veil, USD)
    settle(veil)
    error = _refusal(veil, USD)
    assert error.code == "insufficient_quota" and "USD" in _said(error)


def test_veil_usage_prints_a_table_json_and_csv(veil: VeilThread) -> None:
    chat(veil, A1)
    settle(veil)
    env = {"VEIL_NATS_URL": veil.nats_url}
    body = report(veil, ADMIN, "tenant=acme&group_by=key")
    expected = {r["api_key_id"]: r for r in results(body)}

    as_json = run_veil("usage", "--tenant", "acme", "--by", "key", "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert {r["key_id"]: (r["requests"], r["prompt_tokens"]) for r in rows} == {
        k: (r["num_model_requests"], r["input_tokens"]) for k, r in expected.items()
    }

    as_csv = run_veil("usage", "--tenant", "acme", "--by", "key,model", "--csv", env=env)
    parsed = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert as_csv.returncode == 0 and {r["key_id"] for r in parsed} == set(expected)
    assert {r["model"] for r in parsed} == {"veil"}
    assert sum(int(r["total_tokens"]) for r in parsed) == sum(
        r["input_tokens"] + r["output_tokens"] for r in expected.values()
    )

    table = run_veil("usage", "--tenant", "acme", "--by", "key", env=env)
    lines = table.stdout.splitlines()
    assert table.returncode == 0 and lines[0].split()[:2] == ["KEY_ID", "REQUESTS"]
    assert lines[-1].split()[0] == "TOTAL"
    assert int(lines[-1].split()[1]) == sum(r["num_model_requests"] for r in expected.values())
    bad = run_veil("usage", "--by", "color", env=env)
    assert bad.returncode == 2 and "unknown grouping" in bad.stderr


def test_budgets_fail_closed_when_the_usage_service_is_away(
    upstream: FakeOpenAI, tmp_path: Path
) -> None:
    with nats_server(tmp_path / "nats") as server:
        keys = [ApiKey(key=TIGHT, tenant="t", budget_tokens=1000), ApiKey(key=A1, tenant="t")]
        config = _config(server.url, upstream, keys)
        config.data_dir = str(tmp_path / "data")
        config.usage = UsageConfig(path=str(tmp_path / "held" / "usage.db"))
        held = lock_ledger(config)  # another process owns this ledger: no usage service here
        assert held is not None
        with contextlib.closing(_Fd(held)), VeilThread(config, server.url) as veil:
            with pytest.raises(openai.APIStatusError) as absent:
                chat(veil, TIGHT)
            assert absent.value.status_code == 503
            assert "not running" in _said(absent.value)
            assert absent.value.code == "usage_unavailable"
            chat(veil, A1)  # without a budget, nothing to ask

            silent = threading.Event()

            async def ignore(_msg: Any) -> None:
                silent.set()

            async def never_answer() -> Any:
                nc = await nats.connect(server.url)
                await nc.subscribe(USAGE_SPEND, cb=ignore)
                await nc.flush()
                return nc

            nc = veil.call(never_answer())
            try:
                with pytest.raises(openai.APIStatusError) as late:
                    chat(veil, TIGHT)
                assert late.value.status_code == 503 and silent.is_set()
                assert "did not answer within 2 seconds" in _said(late.value)
            finally:
                veil.call(nc.close())

            # With no usage service, `veil usage` counts the log itself.
            env = {"VEIL_NATS_URL": server.url, "VEIL_DATA_DIR": str(tmp_path / "cli")}
            offline = run_veil("usage", "--json", "--by", "key", env=env)
            assert offline.returncode == 0, offline.stderr
            [row] = [msgspec.json.decode(line) for line in offline.stdout.splitlines()]
            assert row["key_id"] == key_id(A1) and row["requests"] == 1


class _Fd:
    """An open file descriptor that `contextlib.closing` closes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def test_budget_periods_are_utc_months_and_estimates_are_text_over_four() -> None:
    evening_in_rio = datetime(2026, 3, 31, 23, 30, tzinfo=timezone(timedelta(hours=-3)))
    assert period_start(Quota(budget_period="month"), evening_in_rio) == date(2026, 4, 1)
    assert period_start(Quota(budget_period="total"), evening_in_rio) is None
    body = {
        "model": "veil",
        "max_tokens": 100,
        "messages": [
            {"role": "system", "content": "x" * 40},
            {"role": "user", "content": [{"type": "text", "text": "y" * 41}]},
        ],
    }
    assert estimate_tokens(parse_chat_request(msgspec.json.encode(body))) == 81 // 4 + 100
