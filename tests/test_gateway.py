"""The OpenAI face, over real HTTP with the official SDK, through real NATS actors."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats
import nats.aio.client
import openai
import pytest

from config import (
    ApiKey,
    Config,
    EngineConfig,
    MemoryConfig,
    ModelConfig,
    PipelineConfig,
    ServerConfig,
)
from eventstore.events import ReplyCompleted, TurnCancelled, TurnFailed, TurnStarted, model_calls
from eventstore.jetstream import JetStreamEventStore
from testkit.upstreams import FakeAnthropic, FakeOpenAI
from tests.harness import HANG_UP_WORDS, VeilThread, hang_up_mid_stream
from veil.natsserver import NatsServer

KEY_A = "sk-test-tenant-a"
KEY_A2 = "sk-test-tenant-a-second"
KEY_B = "sk-test-tenant-b"
PERSONA = "You are Veil, a careful assistant."


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key="sk-upstream") as fake:
        yield fake


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key="sk-ant-upstream") as fake:
        yield fake


@pytest.fixture(scope="module")
def veil(nats_url: str, upstream: FakeOpenAI, claude: FakeAnthropic) -> Iterator[VeilThread]:
    config = Config(
        server=ServerConfig(max_body_bytes=64 * 1024, turn_timeout=30, accept_timeout=30),
        keys=[
            ApiKey(key=KEY_A, tenant="tenant-a"),
            ApiKey(key=KEY_A2, tenant="tenant-a"),
            ApiKey(key=KEY_B, tenant="tenant-b"),
        ],
        engines={
            "up": EngineConfig(
                kind="openai", base_url=upstream.base_url, api_key="sk-upstream", timeout=2.0
            ),
            "claude": EngineConfig(
                kind="anthropic", base_url=claude.base_url, api_key="sk-ant-upstream", timeout=2.0
            ),
        },
        pipelines={
            # No retries here: these tests are about how one failure reads (fallbacks: tests/test_fallbacks.py).
            "default": PipelineConfig(
                engine="up", model="upstream-secret-model", system_prompt=PERSONA, retries=0
            ),
            "claude": PipelineConfig(
                engine="claude", model="claude-secret-model", system_prompt=PERSONA, retries=0
            ),
        },
        models=[
            ModelConfig(name="veil", pipeline="default"),
            ModelConfig(name="veil-claude", pipeline="claude"),
        ],
        nats_url=nats_url,
        memory=MemoryConfig(enabled=False),  # long-term memory has its own tests
    )
    with VeilThread(config, nats_url) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean_fakes(upstream: FakeOpenAI, claude: FakeAnthropic) -> None:
    upstream.reset()
    claude.reset()


@pytest.fixture
def client(veil: VeilThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=veil.base_url, api_key=KEY_A, max_retries=0, timeout=20) as c:
        yield c


@pytest.fixture
async def aclient(veil: VeilThread) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=veil.base_url, api_key=KEY_A, max_retries=0, timeout=20)


@pytest.fixture(scope="module")
def store(veil: VeilThread) -> Iterator[JetStreamEventStore]:
    """The session log, read on Veil's loop through a connection of its own."""

    async def connect() -> nats.aio.client.Client:
        return await nats.connect(veil.nats_url)

    nc = veil.call(connect())
    yield JetStreamEventStore(nc.jetstream(), nc)
    veil.call(nc.close())


def events_of(veil: VeilThread, store: JetStreamEventStore, session_id: str) -> list[object]:
    """The session's events, of the one tenant that has a session of this id."""
    tenants = veil.call(store.tenants_of(session_id))
    assert len(tenants) <= 1, tenants
    return [s.event for t in tenants for s in veil.call(store.load(t, session_id))]


# --- models ---------------------------------------------------------------------------------


def test_models_lists_public_names_only(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["veil", "veil-claude"]
    assert client.models.retrieve("veil").id == "veil"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("upstream-secret-model")


# --- non-streaming --------------------------------------------------------------------------


def test_completion_has_openai_shape_and_session(
    client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="veil", messages=[{"role": "user", "content": "hello there"}]
    )
    body = json.loads(raw.text)
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "session_id"}
    assert body["object"] == "chat.completion"
    assert body["model"] == "veil"  # the public name, never the upstream's
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "echo: hello there", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert (
        body["usage"]["total_tokens"]
        == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        > 0
    )
    assert raw.headers["x-session-id"] == body["session_id"]
    parsed = raw.parse()
    assert parsed.choices[0].message.content == "echo: hello there"
    sent = upstream.last_request.body
    assert sent["model"] == "upstream-secret-model"
    assert sent["messages"] == [
        {"role": "system", "content": PERSONA},
        {"role": "user", "content": "hello there"},
    ]


def test_multi_turn_memory_by_session(client: openai.OpenAI, upstream: FakeOpenAI) -> None:
    first = client.chat.completions.create(
        model="veil",
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "My name is Ann."},
        ],
    )
    sid = first.model_extra["session_id"]
    # Each of the three ways of naming the session.
    client.chat.completions.create(
        model="veil",
        messages=[{"role": "user", "content": "I like tea."}],
        extra_body={"session_id": sid},
    )
    client.chat.completions.create(
        model="veil",
        messages=[{"role": "user", "content": "And cake."}],
        extra_headers={"X-Session-Id": sid},
    )
    last = client.chat.completions.create(
        model="veil",
        messages=[{"role": "user", "content": "What is my name?"}],
        metadata={"session_id": sid},
    )
    assert last.model_extra["session_id"] == sid
    assert upstream.last_request.body["messages"] == [
        {"role": "system", "content": PERSONA + "\n\nAnswer briefly."},
        {"role": "user", "content": "My name is Ann."},
        {"role": "assistant", "content": "echo: My name is Ann."},
        {"role": "user", "content": "I like tea."},
        {"role": "assistant", "content": "echo: I like tea."},
        {"role": "user", "content": "And cake."},
        {"role": "assistant", "content": "echo: And cake."},
        {"role": "user", "content": "What is my name?"},
    ]


def test_client_resending_whole_history_is_not_duplicated(
    client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    history = [{"role": "user", "content": "one"}]
    first = client.chat.completions.create(model="veil", messages=history)
    sid = first.model_extra["session_id"]
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "two"},
    ]
    client.chat.completions.create(model="veil", messages=history, extra_body={"session_id": sid})
    assert [m["content"] for m in upstream.last_request.body["messages"]] == [
        PERSONA,
        "one",
        "echo: one",
        "two",
    ]


async def test_async_client_non_streaming(aclient: openai.AsyncOpenAI) -> None:
    async with aclient:
        reply = await aclient.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": "hi"}]
        )
    assert reply.choices[0].message.content == "echo: hi"
    assert reply.choices[0].finish_reason == "stop"


# --- streaming ------------------------------------------------------------------------------


def test_streaming_chunks_like_openai(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="veil",
        messages=[{"role": "user", "content": "stream these words please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.model == "veil" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream these words please"
    assert (
        len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    )  # really streamed
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage is not None
        and chunks[-1].usage.total_tokens > 0
    )
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_usage_option_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": "x y"}], stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all("usage" not in (c.model_extra or {}) and c.usage is None for c in chunks)


def test_sdk_stream_helper_consumes_the_stream(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model="veil", messages=[{"role": "user", "content": "helper test"}]
    ) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    assert final.choices[0].message.content == "echo: helper test"
    assert final.choices[0].finish_reason == "stop"


async def test_async_streaming_continues_session(
    aclient: openai.AsyncOpenAI, upstream: FakeOpenAI
) -> None:
    async with aclient:
        first = await aclient.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": "a b"}]
        )
        sid = first.model_extra["session_id"]
        stream = await aclient.chat.completions.create(
            model="veil",
            messages=[{"role": "user", "content": "c d"}],
            stream=True,
            extra_body={"session_id": sid},
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "echo: c d"
    assert [m["content"] for m in upstream.last_request.body["messages"]][1:] == [
        "a b",
        "echo: a b",
        "c d",
    ]


# --- sessions: contract and ownership -------------------------------------------------------


def test_another_tenants_session_id_is_a_free_name(
    veil: VeilThread, client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    sid = client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "mine"}]
    ).model_extra["session_id"]
    other = openai.OpenAI(base_url=veil.base_url, api_key=KEY_B, max_retries=0)
    # Session ids are per tenant: tenant b naming a's id, or a free one, opens its own.
    seen = []
    for name in (sid, f"sess_nope_{uuid.uuid4().hex}"):
        reply = other.chat.completions.create(
            model="veil",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"session_id": name},
        )
        assert reply.model_extra["session_id"] == name
        seen.append([m["content"] for m in upstream.last_request.body["messages"]])
    assert seen[0] == seen[1] and seen[0][-1] == "x" and "mine" not in seen[0]
    # Another key of the same tenant continues a's session.
    same_tenant = openai.OpenAI(base_url=veil.base_url, api_key=KEY_A2, max_retries=0)
    same_tenant.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "ok"}], extra_body={"session_id": sid}
    )
    assert [m["content"] for m in upstream.last_request.body["messages"]][1:] == [
        "mine",
        "echo: mine",
        "ok",
    ]


@pytest.mark.parametrize("bad", ["has.dot", "star*", "gt>", "white space", "x" * 129, "ümlaut"])
def test_bad_session_ids_are_refused(client: openai.OpenAI, bad: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="veil",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"session_id": bad},
        )
    assert info.value.body["param"] == "session_id"


def test_concurrent_requests_on_one_session_are_serialised(
    veil: VeilThread, client: openai.OpenAI, store: JetStreamEventStore
) -> None:
    sid = client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "start"}]
    ).model_extra["session_id"]

    async def burst() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=veil.base_url, api_key=KEY_A, max_retries=0, timeout=20
        ) as c:
            replies = await asyncio.gather(
                *(
                    c.chat.completions.create(
                        model="veil",
                        messages=[{"role": "user", "content": f"msg {i}"}],
                        extra_body={"session_id": sid},
                    )
                    for i in range(8)
                )
            )
        return [r.choices[0].message.content for r in replies]

    replies = asyncio.run(burst())
    assert sorted(replies) == sorted(f"echo: msg {i}" for i in range(8))
    events = events_of(veil, store, sid)
    kinds = [type(e).__name__ for e in events if isinstance(e, TurnStarted | ReplyCompleted)]
    # Every turn closes before the next one starts: no interleaving, none lost.
    assert kinds == ["TurnStarted", "ReplyCompleted"] * 9


def test_idempotency_key_gives_one_reply(
    veil: VeilThread, client: openai.OpenAI, upstream: FakeOpenAI, store: JetStreamEventStore
) -> None:
    key = uuid.uuid4().hex
    first = client.chat.completions.create(
        model="veil",
        messages=[{"role": "user", "content": "once"}],
        extra_headers={"Idempotency-Key": key},
    )
    sid = first.model_extra["session_id"]
    again = client.chat.completions.create(
        model="veil",
        messages=[{"role": "user", "content": "once"}],
        extra_headers={"Idempotency-Key": key},
        extra_body={"session_id": sid},
    )
    assert again.choices[0].message.content == first.choices[0].message.content
    assert len(upstream.requests) == 1
    assert sum(isinstance(e, ReplyCompleted) for e in events_of(veil, store, sid)) == 1


def test_idempotency_key_on_a_first_turn_gives_one_session_and_one_reply(
    veil: VeilThread, client: openai.OpenAI, upstream: FakeOpenAI, store: JetStreamEventStore
) -> None:
    key = uuid.uuid4().hex
    ask = {
        "model": "veil",
        "messages": [{"role": "user", "content": "first"}],
        "extra_headers": {"Idempotency-Key": key},
    }
    first = client.chat.completions.create(**ask)
    again = client.chat.completions.create(**ask)
    sid = first.model_extra["session_id"]
    assert again.model_extra["session_id"] == sid
    assert again.choices[0].message.content == first.choices[0].message.content
    assert len(upstream.requests) == 1
    kinds = [type(e).__name__ for e in events_of(veil, store, sid)]
    assert kinds.count("SessionOpened") == 1 and kinds.count("ReplyCompleted") == 1


def test_a_retried_first_turn_reaching_a_fresh_actor_is_answered_from_the_log(
    veil: VeilThread, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    # Alone on its own NATS, with session actors that passivate at once: the retry meets an
    # actor that assumes the minted session is new, conflicts on its first append, reloads
    # and finds the answer.
    with NatsServer(tmp_path / "nats") as nats_server:
        config = msgspec.structs.replace(
            veil.config,
            server=msgspec.structs.replace(veil.config.server, actor_idle=0.05),
            nats_url=nats_server.url,
            data_dir=Config().data_dir,
        )
        with (
            VeilThread(config, nats_server.url) as forgetful,
            openai.OpenAI(
                base_url=forgetful.base_url, api_key=KEY_A, max_retries=0, timeout=20
            ) as c,
        ):
            ask = {
                "model": "veil",
                "messages": [{"role": "user", "content": "hello"}],
                "extra_headers": {"Idempotency-Key": uuid.uuid4().hex},
            }
            first = c.chat.completions.create(**ask)
            time.sleep(0.3)
            again = c.chat.completions.create(**ask)
    assert again.model_extra["session_id"] == first.model_extra["session_id"]
    assert again.choices[0].message.content == first.choices[0].message.content
    assert len(upstream.requests) == 1


# --- keys -----------------------------------------------------------------------------------


def test_missing_or_wrong_key_is_401(veil: VeilThread) -> None:
    r = http("POST", f"{veil.base_url}/chat/completions", b'{"model": "veil", "messages": []}')
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    bad = openai.OpenAI(base_url=veil.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# --- bad input: OpenAI-shaped errors, nothing logged ----------------------------------------


class Reply:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code = status
        self.body = body

    def json(self) -> dict[str, object]:
        return json.loads(self.body)


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> Reply:
    """A plain HTTP call, to send what the SDK would never send."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=20) as r:
            return Reply(r.status, r.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.read())


def _post(veil: VeilThread, body: bytes, headers: dict[str, str] | None = None) -> Reply:
    return http(
        "POST",
        f"{veil.base_url}/chat/completions",
        body,
        {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json", **(headers or {})},
    )


_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def _chat(**fields: object) -> bytes:
    body = {"model": "veil", "messages": [{"role": "user", "content": "x"}], **fields}
    return json.dumps(body, separators=(",", ":")).encode()


def _nested(prefix: bytes, depth: int, suffix: bytes = b"") -> bytes:
    """A request whose field nests `depth` objects deep."""
    value = b'{"a": ' * depth + b"1" + b"}" * depth
    return (
        b'{"model": "veil", "messages": [{"role": "user", "content": "x"}], '
        + prefix
        + value
        + suffix
        + b"}"
    )


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"", 400, None),
        (b"[]", 400, None),
        (b'{"model": "veil"}', 400, None),
        (b'{"model": "veil", "messages": []}', 400, "messages"),
        (
            b'{"model": "veil", "messages": [{"role": "robot", "content": "x"}]}',
            400,
            "messages[0].role",
        ),
        (
            b'{"model": "veil", "messages": [{"role": "user", "content": 42}]}',
            400,
            "messages[0].content",
        ),
        (b'{"model": "veil", "messages": [{"role": "user"}]}', 400, "messages[0].content"),
        (
            b'{"model": "veil", "messages": [{"role": "user", "content": "x"}], "temperature": 9}',
            400,
            "temperature",
        ),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
        # Bounds OpenAI sets too: nothing is unbounded beyond the body's size.
        (_chat(messages=[{"role": "user", "content": "x"}] * 2049), 400, "messages"),
        (_chat(tools=[_TOOL] * 129), 400, "tools"),
        (_chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        (_chat(metadata={f"k{i}": "v" for i in range(17)}), 400, "metadata"),
        (_chat(metadata={"k": "v" * 513}), 400, "metadata.k"),
        (_nested(b'"response_format": ', 70), 400, "response_format"),
        # Deeper than the decoder recurses: a 400, never a 500 with a traceback.
        (_nested(b'"response_format": ', 5000), 400, None),
        (
            _nested(
                b'"tools": [{"type": "function", "function": {"name": "f", "parameters": ',
                100,
                b"}}]",
            ),
            400,
            "tools",
        ),
    ],
)
def test_bad_requests_get_openai_errors(
    veil: VeilThread, body: bytes, status: int, param: str | None
) -> None:
    r = _post(veil, body)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["param"] == param


def test_body_over_limit_is_413(veil: VeilThread) -> None:
    big = json.dumps(
        {"model": "veil", "messages": [{"role": "user", "content": "x" * 70_000}]}
    ).encode()
    r = _post(veil, big)
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_refused_request_writes_nothing(
    veil: VeilThread, client: openai.OpenAI, store: JetStreamEventStore
) -> None:
    sid = client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "x"}]
    ).model_extra["session_id"]
    before = len(events_of(veil, store, sid))
    for body in (
        {"model": "nope", "messages": [{"role": "user", "content": "x"}], "session_id": sid},
        {"model": "veil", "messages": [{"role": "robot", "content": "x"}], "session_id": sid},
        {"model": "veil", "messages": [], "session_id": sid},
    ):
        assert _post(veil, json.dumps(body).encode()).status_code in (400, 404)
    r = _post(
        veil,
        json.dumps(
            {"model": "veil", "messages": [{"role": "user", "content": "x"}], "session_id": sid}
        ).encode(),
        headers={"Authorization": f"Bearer {KEY_B}"},
    )
    # Another tenant naming the id opens a session of its own: a's log is untouched.
    assert r.status_code == 200
    assert len(veil.call(store.load("tenant-a", sid))) == before


def test_unknown_route_is_openai_404(veil: VeilThread) -> None:
    r = http("GET", f"{veil.base_url}/nothing-here", headers={"Authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 404 and "error" in r.json()


# --- upstream failures ----------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 503])
def test_upstream_failure_is_502_with_reason(
    veil: VeilThread,
    client: openai.OpenAI,
    upstream: FakeOpenAI,
    store: JetStreamEventStore,
    status: int,
) -> None:
    upstream.fail_next(status, message=f"boom {status}")
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="veil", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502
    message = info.value.body["message"]
    assert f"HTTP {status}" in message and "boom" not in message
    # An error answer to a new session carries no id, and leaves no session behind.
    assert info.value.response.headers.get("x-session-id") is None


def test_a_failed_first_turn_retried_by_the_sdk_leaves_no_orphan_sessions(
    veil: VeilThread, upstream: FakeOpenAI, store: JetStreamEventStore
) -> None:
    before = {s.session_id for s in veil.call(store.sessions())}
    upstream.fail_next(503, times=3)
    # The SDK's own retries: three requests, three new sessions tried.
    sdk = openai.OpenAI(base_url=veil.base_url, api_key=KEY_A, max_retries=2)
    with sdk, pytest.raises(openai.APIStatusError) as info:
        sdk.chat.completions.create(model="veil", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502 and len(upstream.requests) == 3
    assert {s.session_id for s in veil.call(store.sessions())} == before


def test_upstream_timeout_is_504(client: openai.OpenAI, upstream: FakeOpenAI) -> None:
    upstream.delay(3.0)  # the engine's timeout is 2 s
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="veil", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 504


def test_failed_turn_is_recorded_and_session_usable(
    veil: VeilThread, client: openai.OpenAI, upstream: FakeOpenAI, store: JetStreamEventStore
) -> None:
    sid = client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "first"}]
    ).model_extra["session_id"]
    upstream.fail_next(500, message="down")
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(
            model="veil",
            messages=[{"role": "user", "content": "lost"}],
            extra_body={"session_id": sid},
        )
    client.chat.completions.create(
        model="veil",
        messages=[{"role": "user", "content": "again"}],
        extra_body={"session_id": sid},
    )
    failed = [e for e in events_of(veil, store, sid) if isinstance(e, TurnFailed)]
    assert len(failed) == 1 and failed[0].status == 502 and "HTTP 500" in failed[0].message
    # The upstream's own words are in the failed call's record, for operators.
    calls = [c for c in model_calls(events_of(veil, store, sid)) if c.status == 502]
    assert len(calls) == 1 and "down" in (calls[0].error or "")
    # The failed turn's message is not part of the conversation the model sees.
    assert [m["content"] for m in upstream.last_request.body["messages"]][1:] == [
        "first",
        "echo: first",
        "again",
    ]


def test_stream_breaking_midway_ends_with_error_chunk(
    client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    upstream.break_stream_after(2)
    stream = client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "one two three four five"}], stream=True
    )
    got: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for c in stream:
            if c.choices and c.choices[0].delta.content:
                got.append(c.choices[0].delta.content)
    assert "".join(got) == "echo: one"
    assert "upstream" in str(info.value.message).lower()


def test_stream_failing_before_first_token_is_plain_http_error(
    client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    upstream.fail_next(500, message="early")
    with pytest.raises(openai.APIStatusError) as info:
        list(
            client.chat.completions.create(
                model="veil", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )
    assert info.value.status_code == 502


async def test_client_disconnect_cancels_and_records_partial(
    veil: VeilThread, upstream: FakeOpenAI, store: JetStreamEventStore
) -> None:
    upstream.token_delay(0.2)
    sid = await hang_up_mid_stream(veil.base_url, KEY_A)
    for _ in range(100):
        events = [
            s.event
            for s in await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(store.load("tenant-a", sid), veil._loop)
            )
        ]
        if any(isinstance(e, TurnCancelled) for e in events):
            break
        await asyncio.sleep(0.1)
    cancelled = [e for e in events if isinstance(e, TurnCancelled)]
    assert len(cancelled) == 1
    assert cancelled[0].content.startswith("echo: w0")
    assert len(cancelled[0].content) < len("echo: " + HANG_UP_WORDS)
    assert cancelled[0].usage.completion_tokens > 0
    assert upstream.last_request.outcome == "disconnected"


# --- Anthropic engine -----------------------------------------------------------------------


def test_anthropic_engine_translates_both_ways(
    client: openai.OpenAI, claude: FakeAnthropic
) -> None:
    first = client.chat.completions.create(
        model="veil-claude",
        messages=[
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "hello claude"},
        ],
        max_tokens=50,
        temperature=0.5,
        stop=["END"],
    )
    assert first.model == "veil-claude"
    assert first.choices[0].message.content == "echo: hello claude"
    assert first.usage.prompt_tokens > 0 and first.usage.completion_tokens > 0
    sent = claude.last_request.body
    assert sent["model"] == "claude-secret-model"
    assert sent["system"] == PERSONA + "\n\nBe terse."
    assert sent["messages"] == [{"role": "user", "content": "hello claude"}]
    assert (
        sent["max_tokens"] == 50
        and sent["temperature"] == 0.5
        and sent["stop_sequences"] == ["END"]
    )
    sid = first.model_extra["session_id"]
    stream = client.chat.completions.create(
        model="veil-claude",
        messages=[{"role": "user", "content": "and more"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"session_id": sid},
    )
    chunks = list(stream)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: and more"
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert claude.last_request.body["messages"] == [
        {"role": "user", "content": "hello claude"},
        {"role": "assistant", "content": "echo: hello claude"},
        {"role": "user", "content": "and more"},
    ]


def test_parameter_an_engine_cannot_honour_is_400_and_writes_nothing(
    veil: VeilThread, client: openai.OpenAI, claude: FakeAnthropic, store: JetStreamEventStore
) -> None:
    first = client.chat.completions.create(
        model="veil-claude", messages=[{"role": "user", "content": "x"}]
    )
    sid = first.model_extra["session_id"]
    before = len(events_of(veil, store, sid))
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="veil-claude",
            messages=[{"role": "user", "content": "y"}],
            seed=7,
            extra_body={"session_id": sid},
        )
    assert info.value.body["param"] == "seed" and info.value.body["code"] == "unsupported_parameter"
    assert len(events_of(veil, store, sid)) == before
    assert len(claude.requests) == 1


def test_anthropic_rate_limit_is_502(client: openai.OpenAI, claude: FakeAnthropic) -> None:
    claude.fail_next(429, message="slow down")
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="veil-claude", messages=[{"role": "user", "content": "x"}]
        )
    message = info.value.body["message"]
    assert info.value.status_code == 502 and "HTTP 429" in message and "slow down" not in message


def test_parameters_reach_the_upstream(client: openai.OpenAI, upstream: FakeOpenAI) -> None:
    client.chat.completions.create(
        model="veil",
        messages=[{"role": "user", "content": "p"}],
        temperature=0.3,
        top_p=0.9,
        max_tokens=7,
        stop=["x"],
        seed=42,
        response_format={"type": "json_object"},
    )
    sent = upstream.last_request.body
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["stop"], sent["seed"]) == (
        0.3,
        0.9,
        7,
        ["x"],
        42,
    )
    assert sent["response_format"] == {"type": "json_object"}


def test_admin_endpoints_need_an_admin_key(veil: VeilThread) -> None:
    r = http("GET", f"{veil.base_url}/knowledge", headers={"Authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


def test_n_choices_on_an_openai_engine_and_the_session_goes_on_from_the_first(
    client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    reply = client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "pick"}], n=3
    )
    assert upstream.last_request.body["n"] == 3
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.message.content for c in reply.choices] == [
        "echo: pick",
        "echo: pick (choice 1)",
        "echo: pick (choice 2)",
    ]
    sid = reply.model_extra["session_id"]
    client.chat.completions.create(
        model="veil", messages=[{"role": "user", "content": "next"}], extra_body={"session_id": sid}
    )
    assert [m["content"] for m in upstream.last_request.body["messages"]][1:] == [
        "pick",
        "echo: pick",
        "next",
    ]
    chunks = list(
        client.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": "two ways"}], n=2, stream=True
        )
    )
    texts: dict[int, str] = {}
    finished: set[int] = set()
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished.add(choice.index)
    assert texts == {0: "echo: two ways", 1: "echo: two ways (choice 1)"} and finished == {0, 1}
    with pytest.raises(openai.BadRequestError) as claude_n:
        client.chat.completions.create(
            model="veil-claude", messages=[{"role": "user", "content": "x"}], n=2
        )
    assert claude_n.value.body["param"] == "n"
