"""Prometheus metrics: the gateway's /metrics (admin only), the workers' listener, and
what each figure counts, read back from the real pages after real requests."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from nats.aio.client import Client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from actors.metrics import WorkerMetrics
from bus.runtime import ActorHost, Envelope
from config import (
    ApiKey,
    Config,
    EngineConfig,
    FallbackConfig,
    MemoryConfig,
    ModelConfig,
    PipelineConfig,
)
from edge.metrics import METRICS, GatewayMetrics, limit_hit
from testkit.procs import VeilProcess, nats_server, run_veil
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread

ADMIN = "sk-metrics-admin"
CHAT = "sk-metrics-chat"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value (0 when absent: a counter nothing has bumped yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture(scope="module")
def up() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def flaky() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply="from flaky") as fake:
        yield fake


@pytest.fixture(scope="module")
def veil(nats_url: str, up: FakeOpenAI, flaky: FakeOpenAI) -> Iterator[VeilThread]:
    config = Config(
        keys=[ApiKey(key=ADMIN, tenant="ops", admin=True), ApiKey(key=CHAT, tenant="team")],
        engines={
            "up": EngineConfig(kind="openai", base_url=up.base_url, api_key="x", timeout=5),
            "flaky": EngineConfig(kind="openai", base_url=flaky.base_url, api_key="x", timeout=5),
        },
        pipelines={
            "plain": PipelineConfig(engine="up", model="up-model"),
            "chained": PipelineConfig(
                engine="flaky",
                model="flaky-model",
                fallbacks=[FallbackConfig(engine="up", model="up-model")],
                retries=1,
                retry_backoff=0.01,
            ),
        },
        models=[
            ModelConfig(name="veil", pipeline="plain"),
            ModelConfig(name="veil-chained", pipeline="chained"),
        ],
        nats_url=nats_url,
        memory=MemoryConfig(max_lag=0),
    )
    with VeilThread(config, nats_url) as server:
        yield server


@pytest.fixture
def client(veil: VeilThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=veil.base_url, api_key=CHAT, max_retries=0, timeout=30) as c:
        yield c


async def _get(url: str, key: str | None = None) -> tuple[int, str, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


def scrape(veil: VeilThread) -> Samples:
    status, kind, text = asyncio.run(_get(f"http://127.0.0.1:{veil.port}/metrics", ADMIN))
    assert status == 200 and kind.startswith("text/plain"), (status, text[:300])
    return parse(text)


def test_metrics_need_an_admin_key(veil: VeilThread) -> None:
    url = f"http://127.0.0.1:{veil.port}/metrics"
    assert asyncio.run(_get(url))[0] == 401
    assert asyncio.run(_get(url, "sk-not-a-key"))[0] == 401
    status, _, text = asyncio.run(_get(url, CHAT))
    assert status == 403 and "admin" in text
    assert asyncio.run(_get(url, ADMIN))[0] == 200


def test_a_turn_is_counted_by_route_status_model_and_tokens(
    veil: VeilThread, client: openai.OpenAI
) -> None:
    before = scrape(veil)
    reply = client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "count my tokens please"}]
    )
    after = scrape(veil)
    route = {"route": "/v1/chat/completions", "model": "veil"}

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("veil_http_requests_total", method="POST", status="200", **route) == 1
    assert delta("veil_http_request_duration_seconds_count", **route) == 1
    # A JSON answer has no first token of its own.
    assert delta("veil_time_to_first_token_seconds_count", model="veil") == 0
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert delta("veil_tokens_total", model="veil", kind="prompt") == reply.usage.prompt_tokens
    assert (
        delta("veil_tokens_total", model="veil", kind="completion") == reply.usage.completion_tokens
    )
    # The model actor counts the same call by engine and upstream model.
    upstream = {"engine": "up", "model": "up-model"}
    assert delta("veil_model_calls_total", outcome="ok", **upstream) == 1
    assert delta("veil_model_tokens_total", kind="prompt", **upstream) == reply.usage.prompt_tokens
    assert delta("veil_model_call_seconds_count", engine="up") == 1


def test_a_stream_has_its_time_to_first_token(veil: VeilThread, client: openai.OpenAI) -> None:
    before = scrape(veil)
    stream = client.chat.completions.create(
        model="veil",
        messages=[{"role": "user", "content": "stream a few words back to me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    after = scrape(veil)
    name = "veil_time_to_first_token_seconds_count"
    assert value(after, name, model="veil") - value(before, name, model="veil") == 1
    first = value(after, "veil_time_to_first_token_seconds_sum", model="veil") - value(
        before, "veil_time_to_first_token_seconds_sum", model="veil"
    )
    request = value(
        after,
        "veil_http_request_duration_seconds_sum",
        route="/v1/chat/completions",
        model="veil",
    ) - value(
        before,
        "veil_http_request_duration_seconds_sum",
        route="/v1/chat/completions",
        model="veil",
    )
    assert 0 < first <= request  # the first token comes before the stream's end
    completion = value(after, "veil_tokens_total", model="veil", kind="completion") - value(
        before, "veil_tokens_total", model="veil", kind="completion"
    )
    assert len(usage) == 1 and completion == usage[0].completion_tokens


def test_retries_fallbacks_and_upstream_errors(
    veil: VeilThread, client: openai.OpenAI, flaky: FakeOpenAI
) -> None:
    before = scrape(veil)
    flaky.fail_next(500, message="flaky is down", times=2)
    reply = client.chat.completions.create(
        model="veil-chained", messages=[{"role": "user", "content": "hello"}]
    )
    assert reply.choices[0].message.content == "echo: hello"  # the fallback's answer
    after = scrape(veil)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("veil_model_retries_total", pipeline="chained", engine="flaky") == 1
    assert delta("veil_model_fallbacks_total", pipeline="chained", engine="up") == 1
    assert delta("veil_model_upstream_errors_total", engine="flaky") == 2
    assert delta("veil_model_calls_total", engine="flaky", outcome="error") == 2
    assert delta("veil_model_calls_total", engine="up", outcome="ok") == 1


def test_labels_stay_bounded(veil: VeilThread, client: openai.OpenAI) -> None:
    """What a client sends never becomes a label: not its model name, path or method."""
    before = scrape(veil)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="made-up-model-7f3a", messages=[{"role": "user", "content": "hi"}]
        )

    async def odd_requests() -> None:
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{veil.port}"
            headers = {"Authorization": f"Bearer {CHAT}"}
            async with http.get(f"{base}/v1/sessions/sess_made-up-9c1d", headers=headers) as r:
                assert r.status == 404
            async with http.request("PROPFIND", f"{base}/v1/models", headers=headers) as r:
                assert r.status == 405

    asyncio.run(odd_requests())
    _, _, text = asyncio.run(_get(f"http://127.0.0.1:{veil.port}/metrics", ADMIN))
    for sent in ("made-up-model-7f3a", "sess_made-up-9c1d", "PROPFIND"):
        assert sent not in text
    after = parse(text)
    chat = {"route": "/v1/chat/completions", "method": "POST", "status": "404", "model": ""}
    assert (
        value(after, "veil_http_requests_total", **chat)
        - value(before, "veil_http_requests_total", **chat)
        == 1
    )
    session = {"route": "/v1/sessions/{session_id}", "method": "GET", "status": "404"}
    assert (
        total(after, "veil_http_requests_total", **session)
        - total(before, "veil_http_requests_total", **session)
        == 1
    )
    assert total(after, "veil_http_requests_total", method="other", status="405") >= 1


def test_actors_and_memory_indexing_are_read_when_scraped(
    veil: VeilThread, client: openai.OpenAI
) -> None:
    client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "remember the blue door"}]
    )
    veil.wait_for_memory()

    async def last_seq() -> int:
        info = await veil.workers.nc.jetstream().stream_info("CHAT_EVENTS")
        return int(info.state.last_seq)

    samples = scrape(veil)
    assert value(samples, "veil_actors_active", service="veil-session") >= 1
    assert ("veil_actor_mailbox_depth", frozenset({("service", "veil-session")})) in samples
    assert value(samples, "veil_memory_index_applied_seq") == veil.call(last_seq())
    assert value(samples, "veil_memory_index_lag_seconds") >= 0
    assert value(samples, "process_open_fds") > 0  # the process's own figures are there too


async def test_mailbox_depth_counts_what_waits_behind_a_busy_actor(nc: Client) -> None:
    release = asyncio.Event()

    class Slow:
        async def receive(self, envelope: Envelope) -> None:
            await release.wait()
            await envelope.request.respond(b"done")

        async def stop(self) -> None:
            pass

    host = ActorHost(
        nc,
        service="metrics-depth",
        version="0.0.1",
        description="a slow actor",
        endpoint="work",
        subject="metrics.depth.*",
        key_of=lambda subject: subject.rsplit(".", 1)[1],
        factory=lambda _key: Slow(),
    )
    await host.start()
    metrics = WorkerMetrics(CollectorRegistry())
    metrics.watch_actors("metrics-depth", lambda: host.active, host.mailbox_depths)
    try:
        asks = [
            asyncio.ensure_future(nc.request("metrics.depth.a", b"", timeout=10)) for _ in range(3)
        ] + [asyncio.ensure_future(nc.request("metrics.depth.b", b"", timeout=10))]
        async with asyncio.timeout(10):
            # a: one request served, two waiting; b: one served (stuck on the same event).
            while (host.active, host.mailbox_depths()) != (2, (2, 2)):
                await asyncio.sleep(0.01)
        samples = parse(generate_latest(metrics.registry).decode())
        assert value(samples, "veil_actor_mailbox_depth", service="metrics-depth") == 2
        assert value(samples, "veil_actor_mailbox_max_depth", service="metrics-depth") == 2
        assert value(samples, "veil_actors_active", service="metrics-depth") == 2
        release.set()
        assert [m.data for m in await asyncio.gather(*asks)] == [b"done"] * 4
        assert host.mailbox_depths() == (0, 0)
    finally:
        release.set()
        await host.stop()


def test_limit_hit_counts_a_refusal_by_limit() -> None:
    app = web.Application()
    app[METRICS] = GatewayMetrics(CollectorRegistry())
    request = make_mocked_request("POST", "/v1/chat/completions", app=app)
    limit_hit(request, "rpm")
    limit_hit(request, "rpm")
    limit_hit(request, "concurrency")
    limit_hit(request, "Tenant acme {evil}")  # not a constant: never a label of its own
    samples = parse(generate_latest(app[METRICS].registry).decode())
    assert value(samples, "veil_rate_limited_total", limit="rpm") == 2
    assert value(samples, "veil_rate_limited_total", limit="concurrency") == 1
    assert value(samples, "veil_rate_limited_total", limit="other") == 1
    assert total(samples, "veil_rate_limited_total") == 4


def test_a_worker_serves_its_metrics_on_its_own_port(up: FakeOpenAI, tmp_path: Path) -> None:
    config = tmp_path / "veil.toml"
    config.write_text(
        f"""
[memory]
enabled = false

[engines.up]
kind = "openai"
base_url = "{up.base_url}"
api_key = "x"

[pipelines.plain]
engine = "up"
model = "up-model"

[[models]]
name = "veil"
pipeline = "plain"
"""
    )
    # A NATS of its own: this worker must not serve the other tests' turns.
    with nats_server(tmp_path / "nats") as nats:
        env = {"VEIL_NATS_URL": nats.url, "VEIL_DATA_DIR": str(tmp_path / "data")}
        with VeilProcess(
            "worker", "--config", str(config), "--metrics-port", "0", env=env
        ) as worker:
            port = worker.wait_for(r"Metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1)
            worker.wait_for("Workers ready")
            status, _, text = asyncio.run(_get(f"http://127.0.0.1:{port}/metrics"))  # no key
    assert status == 200
    samples = parse(text)
    assert ("veil_actors_active", frozenset({("service", "veil-session")})) in samples
    assert re.search(r"^# TYPE veil_model_calls_total counter$", text, re.MULTILINE)
    assert "veil_http_requests_total" not in text  # a worker has no gateway
    assert value(samples, "veil_asyncio_tasks") > 0  # its own loop's, on its own page


def test_the_metrics_port_is_refused_when_it_is_not_a_port(tmp_path: Path) -> None:
    done = run_veil(
        "worker", "--metrics-port", "70000", env={"VEIL_NATS_URL": "nats://127.0.0.1:1"}
    )
    assert done.returncode == 2 and "--metrics-port 70000" in done.stderr


async def test_asyncio_tasks_are_counted_when_scraped() -> None:
    def tasks(registry: CollectorRegistry) -> float:
        text = generate_latest(registry).decode()
        assert text.count("# TYPE veil_asyncio_tasks gauge") == 1, text
        return value(parse(text), "veil_asyncio_tasks")

    # `veil serve` in one process: the gateway's and the workers' metrics share a
    # registry, whichever comes first, and the gauge is there once.
    for first, second in ((GatewayMetrics, WorkerMetrics), (WorkerMetrics, GatewayMetrics)):
        registry = CollectorRegistry()
        first(registry)
        second(registry)
        before = tasks(registry)
        assert before >= 1  # this test's own task at least
        release = asyncio.Event()
        waiting = [asyncio.create_task(release.wait()) for _ in range(5)]
        await asyncio.sleep(0)
        assert tasks(registry) == before + 5
        release.set()
        await asyncio.gather(*waiting)
        assert tasks(registry) == before  # done tasks are not counted: back to where it was


def test_the_gateway_page_counts_its_asyncio_tasks(veil: VeilThread) -> None:
    assert value(scrape(veil), "veil_asyncio_tasks") > 0
