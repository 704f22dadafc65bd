"""Traces: one client request is one trace across the gateway and the actors, carried in
NATS headers; a client's traceparent is continued, a malformed one starts a new trace;
a `veil serve` exports over OTLP/HTTP only when told where to."""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from bus import telemetry
from config import Config, EngineConfig, ModelConfig, PipelineConfig, RoutingRules
from testkit.procs import VeilProcess
from testkit.upstreams import FakeOpenAI, ToolCalls
from tests.harness import VeilThread
from veil.telemetry import setup_tracing

# The turn: the router picks "general" (no keyword), memory is asked (the client names a
# user, whose other sessions may hold memories), the model calls the calculator once.
QUESTION = "What is 6 times 7? Use the calculator."


def calculate_then_answer(body: dict[str, Any]) -> str | ToolCalls:
    if any(m["role"] == "tool" for m in body["messages"]):
        return "It is 42."
    return ToolCalls([("calculator", {"expression": "6*7"})])


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.install(provider)
    yield exporter
    telemetry.install(None)
    provider.shutdown()


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply=calculate_then_answer) as fake:
        yield fake


@pytest.fixture(scope="module")
def veil(nats_url: str, upstream: FakeOpenAI, spans: InMemorySpanExporter) -> Iterator[VeilThread]:
    config = Config(
        engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
        pipelines={
            "general": PipelineConfig(engine="up", model="general-model", tools=["calculator"]),
            "code": PipelineConfig(
                engine="up",
                model="code-model",
                routing=RoutingRules(keywords=["code review"]),
            ),
        },
        models=[ModelConfig(name="veil", pipelines=["general", "code"])],
        nats_url=nats_url,
    )
    with VeilThread(config, nats_url) as server:
        yield server


@pytest.fixture
def client(veil: VeilThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=veil.base_url, api_key="x", max_retries=0, timeout=30) as c:
        yield c


def ask(client: openai.OpenAI, headers: dict[str, str] | None = None) -> tuple[str, int]:
    """One turn; its session id and prompt tokens."""
    reply = client.chat.completions.create(
        model="veil",
        messages=[{"role": "user", "content": QUESTION}],
        user="ann",
        extra_headers=headers,
    )
    assert reply.choices[0].message.content == "It is 42."
    assert reply.usage is not None
    return reply.model_extra["session_id"], reply.usage.prompt_tokens  # type: ignore[index]


EXPECTED = {
    "chat veil",  # the gateway
    "invoke_agent veil",  # the session actor
    "route veil",  # the router
    "search_memory veil-memory",  # long-term memory
    "chat general-model",  # the model actor (twice: before and after the tool)
    "execute_tool calculator",  # the tool actor
}


def trace_of(exporter: InMemorySpanExporter, session_id: str) -> list[ReadableSpan]:
    """The spans of the trace whose gateway span served `session_id`, once all have ended
    (the session actor's ends just after the reply went out)."""
    deadline = time.monotonic() + 10
    while True:
        finished = exporter.get_finished_spans()
        roots = [
            s
            for s in finished
            if s.name == "chat veil"
            and s.kind == SpanKind.SERVER
            and s.attributes is not None
            and s.attributes.get("gen_ai.conversation.id") == session_id
        ]
        if roots:
            trace_id = roots[0].context.trace_id
            mine = [s for s in finished if s.context.trace_id == trace_id]
            if EXPECTED <= {s.name for s in mine} or time.monotonic() > deadline:
                return mine
        elif time.monotonic() > deadline:
            return []
        time.sleep(0.05)


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_one_turn_is_one_trace_across_every_hop(
    client: openai.OpenAI, spans: InMemorySpanExporter
) -> None:
    session_id, prompt_tokens = ask(client)
    trace = trace_of(spans, session_id)
    assert EXPECTED <= {s.name for s in trace}, sorted(s.name for s in trace)

    gateway = one(trace, "chat veil")
    agent = one(trace, "invoke_agent veil")
    assert gateway.parent is None  # no traceparent sent: a new trace starts here
    assert parent_id(agent) == gateway.context.span_id  # across NATS
    for name in ("route veil", "search_memory veil-memory", "execute_tool calculator"):
        assert parent_id(one(trace, name)) == agent.context.span_id, name
    model_calls = [s for s in trace if s.name == "chat general-model"]
    assert len(model_calls) == 2
    assert all(parent_id(s) == agent.context.span_id for s in model_calls)
    assert len(trace) == len(EXPECTED) + 1  # nothing else, nothing twice

    # Named and attributed after the GenAI semantic conventions.
    assert gateway.attributes is not None and agent.attributes is not None
    assert gateway.attributes["gen_ai.operation.name"] == "chat"
    assert gateway.attributes["gen_ai.request.model"] == "veil"
    assert gateway.attributes["gen_ai.usage.input_tokens"] == prompt_tokens
    assert gateway.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert gateway.attributes["http.response.status_code"] == 200
    assert gateway.attributes["http.route"] == "/v1/chat/completions"
    assert agent.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert agent.attributes["gen_ai.conversation.id"] == session_id
    assert agent.attributes["veil.pipeline"] == "general"
    first, second = sorted(model_calls, key=lambda s: s.start_time or 0)
    assert first.kind == SpanKind.CLIENT and first.attributes is not None
    assert first.attributes["gen_ai.provider.name"] == "openai"
    assert first.attributes["gen_ai.request.model"] == "general-model"
    assert first.attributes["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert second.attributes is not None
    assert second.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert int(str(second.attributes["gen_ai.usage.output_tokens"])) > 0
    tool = one(trace, "execute_tool calculator")
    assert tool.attributes is not None and tool.attributes["gen_ai.tool.name"] == "calculator"
    route = one(trace, "route veil")
    assert route.attributes is not None and route.attributes["veil.route.pipeline"] == "general"


def test_a_clients_traceparent_is_continued(
    client: openai.OpenAI, spans: InMemorySpanExporter
) -> None:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    session_id, _ = ask(client, {"traceparent": f"00-{trace_id}-{span_id}-01"})
    trace = trace_of(spans, session_id)
    gateway = one(trace, "chat veil")
    assert gateway.context.trace_id == int(trace_id, 16)
    assert parent_id(gateway) == int(span_id, 16)
    assert gateway.parent is not None and gateway.parent.is_remote
    assert EXPECTED <= {s.name for s in trace}  # every hop joined the client's trace


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-not-hex-at-all-01",
        "00-" + "0" * 32 + "-" + "1" * 16 + "-01",  # an all-zero trace id is invalid
        "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",  # version ff is forbidden
        "00-" + "a" * 32 + "-" + "b" * 16 + "-01-extra",  # version 00 has no more fields
        "00-" + "c" * 32 + "-" + "d" * 16 + "-01" + "x" * 4000,  # huge
    ],
)
def test_a_malformed_traceparent_starts_a_new_trace(
    client: openai.OpenAI, spans: InMemorySpanExporter, traceparent: str
) -> None:
    session_id, _ = ask(client, {"traceparent": traceparent, "tracestate": "k=" + "v" * 2000})
    trace = trace_of(spans, session_id)
    gateway = one(trace, "chat veil")
    assert gateway.parent is None
    sent = {int(x, 16) for x in re.findall(r"[0-9a-f]{32}", traceparent)}
    assert gateway.context.trace_id not in sent
    assert EXPECTED <= {s.name for s in trace}  # the new trace still spans every hop


def test_tracing_off_is_nothing_but_a_shared_null_context(spans: InMemorySpanExporter) -> None:
    provider = telemetry.provider()
    telemetry.install(None)
    try:
        assert not telemetry.enabled()
        with telemetry.span("anything") as span:
            assert span is None
        assert telemetry.span("a") is telemetry.span("b")  # no object made per call
        assert telemetry.outgoing() is None  # no headers on the bus
        assert telemetry.incoming({"traceparent": f"00-{'a' * 32}-{'b' * 16}-01"}) is None
        assert not setup_tracing("test", env={})  # no endpoint: no SDK, no exporter
        assert telemetry.provider() is None
    finally:
        telemetry.install(provider)


class Collector:
    """An OTLP/HTTP receiver on loopback: what POST /v1/traces brought, decoded."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.content_types: list[str] = []

    async def receive(self, request: web.Request) -> web.Response:
        self.content_types.append(request.content_type)
        self.requests.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    def spans(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(service name, span name, attributes) of every span received."""
        found = []
        for export in self.requests:
            for resource_spans in export.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        attributes = {a.key: a.value for a in span.attributes}
                        found.append((resource["service.name"], span.name, attributes))
        return found


def test_veil_serve_exports_spans_over_otlp_http(tmp_path: Path, upstream: FakeOpenAI) -> None:
    collector = Collector()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/traces", collector.receive)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    env = {
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": "x",
        "VEIL_DATA_DIR": str(tmp_path / "data"),
        "VEIL_NATS_URL": "",
        "VEIL_CONFIG": "",
        "VEIL_API_KEYS": "",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: export soon after the turn
    }
    try:
        with VeilProcess("serve", "--port", "0", env=env) as serve:
            veil_port = serve.wait_for(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1").group(1)
            with openai.OpenAI(
                base_url=f"http://127.0.0.1:{veil_port}/v1", api_key="x", max_retries=0
            ) as client:
                reply = client.chat.completions.create(
                    model="veil", messages=[{"role": "user", "content": "hello over otlp"}]
                )
            session_id = reply.model_extra["session_id"]  # type: ignore[index]
        # Stopping flushes what the batch processor still held.
        received = collector.spans()
        names = {name for _, name, _ in received}
        assert {"chat veil", "invoke_agent veil", "chat gpt-4o-mini"} <= names, names
        assert {service for service, _, _ in received} == {"veil-serve"}
        assert set(collector.content_types) == {"application/x-protobuf"}
        conversations = {
            attributes["gen_ai.conversation.id"].string_value
            for _, name, attributes in received
            if name == "invoke_agent veil"
        }
        assert conversations == {session_id}
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()
