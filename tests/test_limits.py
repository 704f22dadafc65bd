"""Rate limits per API key and per tenant, shared by every gateway through one JetStream
key-value bucket: two gateway apps, each with its own NATS connection and its own limit
store, in front of one worker and one nats-server.

The gateways' limit stores read one clock that the tests move by hand: what a test sees
never depends on how fast this machine runs it.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import nats
import openai
import pytest
from aiohttp import web

from bus.subjects import LIMITS_BUCKET
from config import (
    ApiKey,
    Config,
    ConfigError,
    EngineConfig,
    MemoryConfig,
    ModelConfig,
    PipelineConfig,
    load_config,
)
from config.schema import TenantConfig
from contracts.keys import Quota
from contracts.limits import LIMIT_STATE_CODEC
from edge.admission import LIMITS
from edge.limit_window import Ask
from edge.limits import LimitStore, LimitsUnavailable, key_scope, tenant_scope
from testkit.procs import nats_server, run_veil
from testkit.upstreams import FakeOpenAI
from tests.harness import HANG_UP_WORDS, VeilThread, hang_up_mid_stream
from veil.server import serve_gateway

ADMIN = "sk-limits-admin"
# Config keys of tenant "shared", whose tenant limit they share; neither has its own.
SHARED_1, SHARED_2 = "sk-limits-shared-1", "sk-limits-shared-2"
RATE_HEADERS = [
    f"x-ratelimit-{what}-{dimension}"
    for dimension in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
]
# OpenAI's durations: "20ms", "1s", "59.5s", "6m0s".
DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")


class Clock:
    """Wall-clock time that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = float(math.floor(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Gateways:
    urls: list[str]
    apps: list[web.Application]
    config: Config
    clock: Clock
    nats_url: str
    upstream: FakeOpenAI


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def gw(nats_url: str, upstream: FakeOpenAI) -> Iterator[Gateways]:
    config = Config(
        keys=[
            ApiKey(key=ADMIN, tenant="ops", admin=True),
            ApiKey(key=SHARED_1, tenant="shared"),
            ApiKey(key=SHARED_2, tenant="shared"),
        ],
        tenants={"shared": TenantConfig(rpm=4), "team": TenantConfig(rpm=2)},
        engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
        pipelines={"p": PipelineConfig(engine="up", model="m")},
        models=[ModelConfig(name="veil", pipeline="p")],
        nats_url=nats_url,
        memory=MemoryConfig(enabled=False),
    )
    clock = Clock()
    with VeilThread(config, nats_url) as veil:  # the worker (and a gateway left unused)

        async def start() -> list[tuple[web.AppRunner, int]]:
            return [await serve_gateway(config, nats_url, "127.0.0.1", 0) for _ in range(2)]

        started = veil.call(start())
        try:
            apps = [runner.app for runner, _ in started]
            for app in apps:
                app[LIMITS].clock = clock
            urls = [f"http://127.0.0.1:{port}/v1" for _, port in started]
            yield Gateways(urls, apps, config, clock, nats_url, upstream)
        finally:
            for runner, _ in started:
                veil.call(runner.cleanup())


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any

    def rate(self) -> dict[str, str]:
        return {k: v for k, v in self.headers.items() if k.startswith("x-ratelimit-")}


def chat_body(text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "veil", "messages": [{"role": "user", "content": text}], **extra}


async def call(
    url: str, key: str, method: str = "POST", path: str = "/chat/completions", body: Any = None
) -> Answer:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method,
            url + path,
            json=chat_body() if body is None and method == "POST" else body,
            headers={"Authorization": f"Bearer {key}"},
        ) as response,
    ):
        text = await response.text()
        kind = response.headers.get("Content-Type", "")
        parsed = (
            await response.json(content_type=None) if kind.startswith("application/json") else text
        )
        return Answer(response.status, {k.lower(): v for k, v in response.headers.items()}, parsed)


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 20.0) -> None:
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, "it never happened"
        await asyncio.sleep(0.02)


async def new_key(gw: Gateways, tenant: str = "acme", **quota: Any) -> tuple[str, str]:
    """A managed key with these limits, once every gateway knows it: (id, secret)."""
    made = await call(gw.urls[0], ADMIN, path="/admin/keys", body={"tenant": tenant, **quota})
    assert made.status == 201, made.body
    secret = made.body["key"]
    for url in gw.urls:

        async def known(url: str = url) -> bool:
            return (await call(url, secret, "GET", "/models")).status == 200

        await eventually(known)
    return made.body["id"], secret


async def burst(gw: Gateways, secrets: list[str], count: int) -> list[Answer]:
    """`count` chat requests at once, spread over the gateways and the keys."""
    return await asyncio.gather(
        *(
            call(gw.urls[i % len(gw.urls)], secrets[i % len(secrets)], body=chat_body(f"n{i}"))
            for i in range(count)
        )
    )


def statuses(answers: list[Answer]) -> list[int]:
    return sorted(a.status for a in answers)


async def test_two_gateways_admit_exactly_the_rpm_limit_between_them(gw: Gateways) -> None:
    _, secret = await new_key(gw, rpm=5)
    answers = await burst(gw, [secret], 12)
    assert statuses(answers) == [200] * 5 + [429] * 7, [a.body for a in answers]
    # The window slides: a minute later the key is admitted again, on either gateway.
    gw.clock.advance(60)
    assert statuses(await burst(gw, [secret], 7)) == [200] * 5 + [429] * 2


async def test_concurrent_admissions_never_pass_the_limit(nats_url: str) -> None:
    """Compare-and-set: many charges of one scope at once, from two stores on two
    connections, admit exactly the limit."""
    connections = [await nats.connect(nats_url) for _ in range(2)]
    try:
        stores = [await LimitStore.open(nc.jetstream(), timeout=30) for nc in connections]
        scope, quota = "key.cas_test", Quota(rpm=40, tpm=40 * 7, concurrency=40)
        verdicts = await asyncio.gather(
            *(
                stores[i % 2].charge(scope, quota, Ask(ticket=f"t{i}", tokens=7, lease_until=1e12))
                for i in range(120)
            )
        )
        assert sum(v.admitted for v in verdicts) == 40
        kv = await connections[0].jetstream().key_value(LIMITS_BUCKET)
        stored = LIMIT_STATE_CODEC.decode((await kv.get(scope)).value or b"")
        assert sum(n for _, n in stored.requests) == 40
        assert sum(n for _, n in stored.tokens) == 280 and len(stored.leases) == 40
    finally:
        for nc in connections:
            await nc.close()


async def test_headers_show_what_remains_on_every_answer(gw: Gateways) -> None:
    _, secret = await new_key(gw, rpm=10, tpm=100_000)
    seen = []
    for i in range(3):
        answer = await call(gw.urls[i % 2], secret)
        assert answer.status == 200 and set(answer.rate()) == set(RATE_HEADERS)
        seen.append(answer)
    assert [a.headers["x-ratelimit-remaining-requests"] for a in seen] == ["9", "8", "7"]
    assert all(a.headers["x-ratelimit-limit-requests"] == "10" for a in seen)
    assert all(a.headers["x-ratelimit-limit-tokens"] == "100000" for a in seen)
    tokens = [int(a.headers["x-ratelimit-remaining-tokens"]) for a in seen]
    assert tokens[0] > tokens[1] > tokens[2]
    for a in seen:
        assert DURATION.match(a.headers["x-ratelimit-reset-requests"]), a.headers
        assert DURATION.match(a.headers["x-ratelimit-reset-tokens"]), a.headers
    # A streamed answer has them before its first event; an error answer too.
    streamed = await call(gw.urls[1], secret, body=chat_body(stream=True))
    assert streamed.status == 200 and "data: [DONE]" in streamed.body
    assert streamed.headers["x-ratelimit-remaining-requests"] == "6"
    gw.upstream.fail_next(400, "upstream says no")
    failed = await call(gw.urls[0], secret)
    assert failed.status >= 400 and failed.headers["x-ratelimit-remaining-requests"] == "5"


async def test_a_refusal_is_openais_429_with_retry_after(gw: Gateways) -> None:
    _, secret = await new_key(gw, rpm=1)
    assert (await call(gw.urls[0], secret)).status == 200
    gw.clock.advance(20.5)
    refused = await call(gw.urls[1], secret)
    assert refused.status == 429
    error = refused.body["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert error["message"].startswith("Rate limit reached for API key ")
    assert "requests per min (RPM): Limit 1, Used 1, Requested 1" in error["message"]
    # The request of 20.5 s ago leaves the window in 39.5 s: 40 whole seconds.
    assert refused.headers["retry-after"] == "40"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == "39.5s"
    # The official SDK raises its RateLimitError (and would honour Retry-After).
    async with openai.AsyncOpenAI(base_url=gw.urls[0], api_key=secret, max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as raised:
            await client.chat.completions.create(
                model="veil", messages=[{"role": "user", "content": "hi"}]
            )
    assert raised.value.response.headers["retry-after"] == "40"
    # Operators see the refusals: veil_rate_limited_total{limit="rpm"} on /metrics.
    scraped = await call(gw.urls[1].removesuffix("/v1"), ADMIN, "GET", "/metrics")
    assert scraped.status == 200
    assert re.search(r'veil_rate_limited_total\{limit="rpm"\} [1-9]', scraped.body), scraped.body


async def test_tokens_per_minute_count_the_estimate_then_what_was_used(gw: Gateways) -> None:
    _, secret = await new_key(gw, tpm=1000)
    text = "x" * 40  # 10 estimated tokens
    first = await call(gw.urls[0], secret, body=chat_body(text, max_tokens=700))
    assert first.status == 200
    assert first.headers["x-ratelimit-remaining-tokens"] == str(1000 - 710)
    used = first.body["usage"]["total_tokens"]
    assert 0 < used < 710
    # Settled: the first request counts what it used, no longer its estimate.
    second = await call(gw.urls[1], secret, body=chat_body(text, max_tokens=700))
    assert second.status == 200
    assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - used - 710)
    # Past what remains (it would fit in an empty window): refused until the window
    # lets the tokens of the first two go.
    whole = chat_body(text, max_tokens=990)
    third = await call(gw.urls[0], secret, body=whole)
    assert third.status == 429 and third.body["error"]["type"] == "tokens"
    assert f"Limit 1000, Used {2 * used}, Requested 1000" in third.body["error"]["message"]
    assert int(third.headers["retry-after"]) >= 1
    gw.clock.advance(61)
    assert (await call(gw.urls[0], secret, body=whole)).status == 200


async def test_a_request_that_can_never_fit_is_refused_as_too_large(gw: Gateways) -> None:
    _, secret = await new_key(gw, tpm=1000)
    for max_tokens in (1001, 10**15, 2**63 - 1):
        answer = await call(gw.urls[0], secret, body=chat_body(max_tokens=max_tokens))
        assert answer.status == 429, answer.body
        assert answer.body["error"]["message"].startswith("Request too large for API key ")
        assert answer.headers["x-should-retry"] == "false"  # the SDKs do not retry it
        assert int(answer.headers["retry-after"]) >= 1
    assert (await call(gw.urls[0], secret)).status == 200  # nothing was counted


async def test_concurrency_holds_a_slot_until_the_turn_ends(gw: Gateways) -> None:
    _, secret = await new_key(gw, concurrency=1)
    gate = gw.upstream.hold()
    try:
        held = asyncio.create_task(call(gw.urls[0], secret))

        async def upstream_has_it() -> bool:
            return gw.upstream.pending() >= 1

        await eventually(upstream_has_it)
        refused = await call(gw.urls[1], secret)
        assert refused.status == 429, refused.body
        assert "concurrent requests" in refused.body["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1
    finally:
        gate.set()
    assert (await held).status == 200
    # Released before its answer was sent: the next request is admitted at once.
    assert (await call(gw.urls[1], secret)).status == 200
    assert (await call(gw.urls[0], secret, body=chat_body(stream=True))).status == 200
    assert (await call(gw.urls[1], secret)).status == 200


async def test_a_client_that_leaves_mid_stream_frees_its_slot(gw: Gateways) -> None:
    _, secret = await new_key(gw, concurrency=1, tpm=100_000)
    gw.upstream.token_delay(0.05)
    try:
        await hang_up_mid_stream(gw.urls[0], secret)  # asks max_tokens: none

        async def admitted() -> bool:
            return (await call(gw.urls[1], secret)).status == 200

        await eventually(admitted)
    finally:
        gw.upstream.reset()
    # What the left stream counts: its prompt and what was streamed, a fraction of its text.
    after = await call(gw.urls[0], secret, body=chat_body("ok"))
    remaining = int(after.headers["x-ratelimit-remaining-tokens"])
    assert 100_000 - remaining < 2 * len(HANG_UP_WORDS) // 4 + 100


async def test_a_tenant_limit_is_shared_by_its_keys(gw: Gateways) -> None:
    answers = await burst(gw, [SHARED_1, SHARED_2], 7)
    assert statuses(answers) == [200] * 4 + [429] * 3
    refused = next(a for a in answers if a.status == 429)
    assert "tenant shared" in refused.body["error"]["message"]
    assert refused.headers["x-ratelimit-limit-requests"] == "4"


async def test_a_key_charge_is_taken_back_when_its_tenant_refuses(gw: Gateways) -> None:
    key_id, secret = await new_key(gw, tenant="team", rpm=5)
    answers = [await call(gw.urls[i % 2], secret) for i in range(4)]
    assert [a.status for a in answers] == [200, 200, 429, 429]
    # The tightest limit is the tenant's (2), whose refusal it was.
    assert answers[1].headers["x-ratelimit-limit-requests"] == "2"
    assert "tenant team" in answers[2].body["error"]["message"]
    nc = await nats.connect(gw.nats_url)
    try:
        kv = await nc.jetstream().key_value(LIMITS_BUCKET)
        stored = LIMIT_STATE_CODEC.decode((await kv.get(key_scope(key_id))).value or b"")
    finally:
        await nc.close()
    assert sum(n for _, n in stored.requests) == 2  # the two refused ones were undone


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[tenants.acme]\nrpm = 0\n", r":2: tenants.acme.rpm: must be from 1 to 1,000,000,000,000"),
        ('[[keys]]\nkey = "sk-x"\ntpm = 1000000000001\n', r":3: keys\[0\].tpm: must be from 1"),
        ("[limits]\ntimeout = 0\n", r":2: limits.timeout: must be more than 0 seconds"),
    ],
)
def test_the_config_refuses_limits_that_cannot_work(tmp_path: Path, text: str, error: str) -> None:
    file = tmp_path / "veil.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=error):
        load_config(file, env={})


def test_every_scope_name_is_a_valid_entry_key() -> None:
    assert key_scope("key_0123abcd") == "key.key_0123abcd"
    assert tenant_scope("team-a") == "tenant.team-a"
    odd = [tenant_scope(t) for t in ("team a", "a.b", "a>*", "é", "=x", "")]
    assert len(set(odd)) == len(odd)
    assert all(re.fullmatch(r"tenant\.=[0-9a-f]{32}", scope) for scope in odd)


async def test_callers_without_limits_get_no_rate_headers(gw: Gateways) -> None:
    answer = await call(gw.urls[0], ADMIN)
    assert answer.status == 200 and answer.rate() == {}
    assert "retry-after" not in answer.headers


async def test_absurd_limits_are_refused_at_creation(gw: Gateways) -> None:
    for field, value in (
        ("rpm", 0),
        ("rpm", -1),
        ("tpm", 10**12 + 1),
        ("concurrency", 1.5),
        ("concurrency", "3"),
        ("rpm", True),
        ("budget_tokens", 0),
        ("budget_usd", -1),
        ("budget_usd", 1e13),
        ("budget_period", "year"),
    ):
        answer = await call(
            gw.urls[0], ADMIN, path="/admin/keys", body={"tenant": "acme", field: value}
        )
        assert answer.status == 400, (field, value, answer.body)
        assert answer.body["error"]["param"] == field, answer.body
    made = await call(
        gw.urls[0],
        ADMIN,
        path="/admin/keys",
        body={"tenant": "acme", "rpm": 10**12, "budget_usd": 12.5, "budget_period": "total"},
    )
    assert made.status == 201
    shown = await call(gw.urls[1], ADMIN, "GET", f"/admin/keys/{made.body['id']}")
    assert (shown.body["rpm"], shown.body["tpm"]) == (10**12, None)
    assert (shown.body["budget_usd"], shown.body["budget_period"]) == (12.5, "total")


async def test_a_keys_limits_change_at_run_time(gw: Gateways) -> None:
    key_id, secret = await new_key(gw, rpm=1)
    assert [(await call(gw.urls[0], secret)).status for _ in range(2)] == [200, 429]
    changed = await call(gw.urls[1], ADMIN, "PATCH", f"/admin/keys/{key_id}", {"rpm": 3})
    assert changed.status == 200 and changed.body["rpm"] == 3

    async def admitted() -> bool:
        return (await call(gw.urls[0], secret)).status == 200

    await eventually(admitted)
    removed = await call(gw.urls[0], ADMIN, "PATCH", f"/admin/keys/{key_id}", {"rpm": None})
    assert removed.status == 200 and removed.body["rpm"] is None

    async def unlimited() -> bool:
        return (await call(gw.urls[1], secret)).rate() == {}

    await eventually(unlimited)
    bad = await call(gw.urls[0], ADMIN, "PATCH", f"/admin/keys/{key_id}", {"tpm": 0})
    assert bad.status == 400 and bad.body["error"]["param"] == "tpm"
    gone = await call(gw.urls[0], ADMIN, "PATCH", "/admin/keys/key_nope", {"rpm": 1})
    assert gone.status == 404


def test_veil_keys_sets_and_shows_limits(gw: Gateways) -> None:
    env = {"VEIL_NATS_URL": gw.nats_url}
    made = run_veil(
        "keys", "create", "--tenant", "cli", "--rpm", "5", "--tpm", "1000", "--concurrency", "2",
        env=env,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    listed = run_veil("keys", "ls", "--tenant", "cli", env=env)
    assert "rpm=5,tpm=1000,concurrency=2" in listed.stdout, listed.stdout
    key_id = listed.stdout.splitlines()[1].split()[0]
    updated = run_veil("keys", "update", key_id, "--rpm", "none", "--budget-usd", "9.5", env=env)
    assert updated.returncode == 0, updated.stderr
    assert "tpm=1000,concurrency=2,budget_usd=9.5,per=month" in updated.stdout
    for bad in ("0", "-3", "1e3", "1000000000001", "many"):
        refused = run_veil("keys", "create", "--tenant", "cli", "--rpm", bad, env=env)
        assert refused.returncode == 2 and "--rpm" in refused.stderr, (bad, refused.stderr)


async def test_an_unreachable_limit_store_fails_closed_or_open(gw: Gateways) -> None:
    """Runs last: it deletes the bucket under the running gateways, then makes it again."""
    _, secret = await new_key(gw, rpm=100)
    assert (await call(gw.urls[0], secret)).status == 200
    nc = await nats.connect(gw.nats_url)
    try:
        await nc.jetstream().delete_key_value(LIMITS_BUCKET)
        closed = await call(gw.urls[0], secret)
        assert closed.status == 503, closed.body
        assert closed.body["error"]["code"] == "limits_unavailable"
        assert "rate limit store is unavailable" in closed.body["error"]["message"]
        # Callers without limits never ask the store.
        assert (await call(gw.urls[1], ADMIN)).status == 200
        gw.config.limits.fail_open = True
        opened = await call(gw.urls[1], secret)
        assert opened.status == 200 and opened.rate() == {}
    finally:
        gw.config.limits.fail_open = False
        await LimitStore.open(nc.jetstream(), timeout=5)  # the bucket again
        await nc.close()
    assert (await call(gw.urls[0], secret)).status == 200


async def test_a_store_that_does_not_answer_gives_up_in_time(tmp_path: Path) -> None:
    with nats_server(tmp_path) as server:
        nc = await nats.connect(server.url, max_reconnect_attempts=-1)
        store = await LimitStore.open(nc.jetstream(), timeout=0.5)
    # The server is gone; the client waits to reconnect, and nothing answers.
    try:
        async with asyncio.timeout(30):  # a bound for a hang, not a measurement
            with pytest.raises(LimitsUnavailable):
                await store.charge("key.x", Quota(rpm=1), Ask(ticket="t", tokens=0, lease_until=0))
    finally:
        await nc.close()
