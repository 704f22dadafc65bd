"""The Anthropic door (POST /v1/messages): the official anthropic SDK, unmodified, over real
HTTP, through real NATS actors, to fake OpenAI and Anthropic upstreams on loopback."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import anthropic
import msgspec
import nats
import openai
import pytest
import requests

from config import ApiKey, Config, EngineConfig, MemoryConfig, ModelConfig, PipelineConfig
from config.schema import ServerConfig
from contracts.session import StartTurn, TurnDone
from edge.anthropic_answer import message_of
from edge.anthropic_wire import parse_messages_request, to_chat_request
from edge.history_index import canonical, conversation_digest, reply_message
from edge.openai_wire import to_chat_messages
from eventstore.events import ChatMessage, FunctionCall, SessionOpened, ToolCall, Usage
from testkit.upstreams import FakeAnthropic, FakeOpenAI, Fault, ToolCalls
from tests.harness import VeilThread

KEY_A = "sk-anthropic-door-a"
KEY_B = "sk-anthropic-door-b"
KEY_ANN = "sk-anthropic-door-ann"  # tenant a, pinned to the end user "ann"
KEY_ONCE = "sk-anthropic-door-one-a-minute"
PERSONA = "You are Veil, a careful assistant."
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


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
        server=ServerConfig(max_body_bytes=256 * 1024, turn_timeout=30, accept_timeout=30),
        keys=[
            ApiKey(key=KEY_A, tenant="tenant-a"),
            ApiKey(key=KEY_B, tenant="tenant-b"),
            ApiKey(key=KEY_ANN, tenant="tenant-a", user="ann"),
            ApiKey(key=KEY_ONCE, tenant="tenant-c", rpm=1),
        ],
        engines={
            "up": EngineConfig(
                kind="openai", base_url=upstream.base_url, api_key="sk-upstream", timeout=5.0
            ),
            "claude": EngineConfig(
                kind="anthropic", base_url=claude.base_url, api_key="sk-ant-upstream", timeout=5.0
            ),
        },
        pipelines={
            "default": PipelineConfig(
                engine="up", model="upstream-model", system_prompt=PERSONA, retries=0
            ),
            "claude": PipelineConfig(
                engine="claude", model="claude-upstream", system_prompt=PERSONA, retries=0
            ),
        },
        models=[
            ModelConfig(name="veil", pipeline="default"),
            ModelConfig(name="veil-claude", pipeline="claude"),
        ],
        memory=MemoryConfig(enabled=True),
        nats_url=nats_url,
    )
    with VeilThread(config, nats_url) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean_fakes(upstream: FakeOpenAI, claude: FakeAnthropic) -> None:
    for fake in (upstream, claude):
        fake.reset()
        fake.reply = None


def root(veil: VeilThread) -> str:
    """What an Anthropic client takes as its base URL (it adds /v1/messages itself)."""
    return f"http://127.0.0.1:{veil.port}"


@pytest.fixture
def client(veil: VeilThread) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=root(veil), api_key=KEY_A, max_retries=0, timeout=30) as c:
        yield c


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def post(veil: VeilThread, body: Any, key: str = KEY_A, **kwargs: Any) -> requests.Response:
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01", **kwargs.pop("headers", {})}
    if isinstance(body, bytes):
        headers.setdefault("Content-Type", "application/json")
        return requests.post(
            f"{root(veil)}/v1/messages", data=body, headers=headers, timeout=30, **kwargs
        )
    return requests.post(
        f"{root(veil)}/v1/messages", json=body, headers=headers, timeout=30, **kwargs
    )


def log_position(veil: VeilThread) -> int:
    async def last() -> int:
        nc = await nats.connect(veil.nats_url)
        try:
            return int((await nc.jetstream().stream_info("CHAT_EVENTS")).state.last_seq)
        finally:
            await nc.close()

    return veil.call(last())


def session_messages(veil: VeilThread, sid: str, key: str = KEY_A) -> list[dict[str, Any]]:
    reply = requests.get(
        f"{veil.base_url}/sessions/{sid}/messages",
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    return [{"role": m["role"], "content": m["content"]} for m in reply.json()["data"]]


# --- recognising a resent conversation (pure) ----------------------------------------------------


@pytest.mark.parametrize(
    "arguments",
    ['{"b": 1, "a": [2, {"d": 3, "c": 4}]}', '{"city": "Par', ""],
    ids=["spaced JSON", "broken JSON", "none"],
)
def test_a_reply_and_the_blocks_its_client_resends_have_one_digest(arguments: str) -> None:
    call = ToolCall(id="call_1", function=FunctionCall(name="f", arguments=arguments))
    done = TurnDone(
        content="Let me look.", finish_reason="tool_calls", usage=Usage(), tool_calls=[call]
    )
    start = StartTurn(
        command_id="c1", turn_id="c1", session_id="s1", new_session=True, tenant="t",
        key_id="k", model="veil", messages=[],
    )  # fmt: skip
    got = msgspec.json.decode(msgspec.json.encode(message_of(start, done)))
    blocks = [
        {**b, "input": dict(reversed(b["input"].items()))} if "input" in b else b
        for b in got["content"]
    ]
    resent = {
        "model": "veil",
        "max_tokens": 5,
        "messages": [user("hi"), {"role": "assistant", "content": blocks}, user("next")],
    }
    chat = to_chat_request(parse_messages_request(msgspec.json.encode(resent)))
    as_resent = [canonical(m) for m in to_chat_messages(chat)[:2]]
    as_answered = [
        canonical(ChatMessage(role="user", content="hi")),
        canonical(reply_message(done)),
    ]
    scope = ("tenant-a", "", "")
    assert conversation_digest(scope, as_resent) == conversation_digest(scope, as_answered)
    for other in (("tenant-b", "", ""), ("tenant-a", "ann", ""), ("tenant-a", "", "ann")):
        assert conversation_digest(other, as_resent) != conversation_digest(scope, as_answered)


# --- the answer --------------------------------------------------------------------------------


def test_a_message_has_anthropics_shape(client: anthropic.Anthropic, upstream: FakeOpenAI) -> None:
    raw = client.messages.with_raw_response.create(
        model="veil", max_tokens=100, messages=[user("hello there")]
    )
    body = raw.json()
    assert isinstance(body, dict)
    assert set(body) == {
        "id",
        "type",
        "role",
        "model",
        "content",
        "stop_reason",
        "stop_sequence",
        "usage",
        "session_id",
    }
    assert body["id"].startswith("msg_") and body["type"] == "message"
    assert body["role"] == "assistant" and body["model"] == "veil"
    assert body["content"] == [{"type": "text", "text": "echo: hello there"}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    assert body["usage"]["input_tokens"] > 0 and body["usage"]["output_tokens"] > 0
    assert raw.headers["x-session-id"] == body["session_id"]
    message = raw.parse()
    assert message.content[0].type == "text" and message.content[0].text == "echo: hello there"
    sent = upstream.last_request.body
    assert sent["model"] == "upstream-model" and sent["max_tokens"] == 100
    assert sent["messages"] == [
        {"role": "system", "content": PERSONA},
        {"role": "user", "content": "hello there"},
    ]


async def test_the_async_client(veil: VeilThread) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=root(veil), api_key=KEY_A, max_retries=0, timeout=30
    ) as client:
        message = await client.messages.create(
            model="veil", max_tokens=50, messages=[user("async hello")]
        )
        assert message.content[0].type == "text"
        assert message.content[0].text == "echo: async hello"
        async with client.messages.stream(
            model="veil", max_tokens=50, messages=[user("async stream")]
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
    assert text == "echo: async stream" and final.stop_reason == "end_turn"


def test_the_stream_helper(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="veil", max_tokens=100, messages=[user("one two three four")]
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == "echo: one two three four"
    assert final.id.startswith("msg_") and final.stop_reason == "end_turn"
    assert final.content[0].type == "text" and final.content[0].text == "echo: one two three four"
    # The totals come with message_delta and replace message_start's zeros.
    assert final.usage.input_tokens > 0 and final.usage.output_tokens == len(pieces)


def test_raw_stream_events_in_order(client: anthropic.Anthropic, veil: VeilThread) -> None:
    events = list(
        client.messages.create(
            model="veil", max_tokens=100, messages=[user("raw events")], stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert events[-2].delta.stop_reason == "end_turn"
    # Over the wire: each event names its type twice (the SDK drops pings), and no [DONE].
    reply = post(
        veil, {"model": "veil", "max_tokens": 50, "messages": [user("wire")], "stream": True}
    )
    assert reply.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in reply.text.split("\n\n") if f]
    names = []
    for frame in frames:
        event, data = frame.split("\n")
        name = event.removeprefix("event: ")
        assert json.loads(data.removeprefix("data: "))["type"] == name
        names.append(name)
    assert names[:2] == ["message_start", "ping"] and names[-1] == "message_stop"
    start = json.loads(frames[0].split("\n")[1].removeprefix("data: "))["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["session_id"] == reply.headers["x-session-id"]


# --- sessions ------------------------------------------------------------------------------------


def test_resending_the_history_continues_its_session(
    client: anthropic.Anthropic, veil: VeilThread, upstream: FakeOpenAI
) -> None:
    history = [user("My name is Ann.")]
    first = client.messages.with_raw_response.create(model="veil", max_tokens=50, messages=history)
    sid = first.headers["x-session-id"]
    history += [{"role": "assistant", "content": first.parse().content}, user("I like tea.")]
    second = client.messages.with_raw_response.create(model="veil", max_tokens=50, messages=history)
    assert second.headers["x-session-id"] == sid
    # The model gets the conversation once: nothing resent is stored twice.
    assert upstream.last_request.body["messages"] == [
        {"role": "system", "content": PERSONA},
        {"role": "user", "content": "My name is Ann."},
        {"role": "assistant", "content": "echo: My name is Ann."},
        {"role": "user", "content": "I like tea."},
    ]
    # A streamed turn continues it too, and the stream's reply is recognised next time.
    history += [{"role": "assistant", "content": second.parse().content}, user("And cake.")]
    with client.messages.stream(model="veil", max_tokens=50, messages=history) as stream:
        final = stream.get_final_message()
        assert stream.response.headers["x-session-id"] == sid
    history += [{"role": "assistant", "content": final.content}, user("What is my name?")]
    last = client.messages.with_raw_response.create(model="veil", max_tokens=50, messages=history)
    assert last.headers["x-session-id"] == sid
    assert len(upstream.last_request.body["messages"]) == 1 + 7
    # Naming the session as well changes nothing.
    history += [{"role": "assistant", "content": last.parse().content}, user("Thanks.")]
    named = client.messages.with_raw_response.create(
        model="veil", max_tokens=50, messages=history, extra_headers={"X-Session-Id": sid}
    )
    assert named.headers["x-session-id"] == sid
    assert len(upstream.last_request.body["messages"]) == 1 + 9
    assert [m["content"] for m in session_messages(veil, sid)] == [
        "My name is Ann.",
        "echo: My name is Ann.",
        "I like tea.",
        "echo: I like tea.",
        "And cake.",
        "echo: And cake.",
        "What is my name?",
        "echo: What is my name?",
        "Thanks.",
        "echo: Thanks.",
    ]


def test_an_edited_history_is_a_new_session(client: anthropic.Anthropic, veil: VeilThread) -> None:
    first = client.messages.with_raw_response.create(
        model="veil", max_tokens=50, messages=[user("Plan a trip.")]
    )
    sid = first.headers["x-session-id"]
    reply = {"role": "assistant", "content": first.parse().content}
    edited = {"role": "assistant", "content": "Something I never said."}
    fork = client.messages.with_raw_response.create(
        model="veil", max_tokens=50, messages=[user("Plan a trip."), edited, user("Where to?")]
    )
    assert fork.headers["x-session-id"] != sid
    # The new session holds the whole conversation as it was sent.
    assert [m["content"] for m in session_messages(veil, fork.headers["x-session-id"])][:3] == [
        "Plan a trip.",
        "Something I never said.",
        "Where to?",
    ]
    # The untouched history still continues the first session.
    same = client.messages.with_raw_response.create(
        model="veil", max_tokens=50, messages=[user("Plan a trip."), reply, user("By train.")]
    )
    assert same.headers["x-session-id"] == sid


def test_x_session_id_names_the_session(
    client: anthropic.Anthropic, veil: VeilThread, upstream: FakeOpenAI
) -> None:
    # A session the chat door opened, continued here with only the new message.
    with openai.OpenAI(base_url=veil.base_url, api_key=KEY_A, max_retries=0) as chat:
        opened = chat.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": "Remember: blue."}]
        )
    sid = opened.model_extra["session_id"]
    message = client.messages.with_raw_response.create(
        model="veil",
        max_tokens=50,
        messages=[user("Which colour?")],
        extra_headers={"X-Session-Id": sid},
    )
    assert message.headers["x-session-id"] == message.parse().model_extra["session_id"] == sid
    assert [m["content"] for m in upstream.last_request.body["messages"][1:]] == [
        "Remember: blue.",
        "echo: Remember: blue.",
        "Which colour?",
    ]
    # Resending a history that this session has moved past is another conversation.
    stale = [
        user("Remember: blue."),
        {"role": "assistant", "content": "echo: Remember: blue."},
        user("Which shape?"),
    ]
    other = client.messages.with_raw_response.create(model="veil", max_tokens=50, messages=stale)
    assert other.headers["x-session-id"] != sid


def test_a_session_continued_elsewhere_is_not_taken_by_its_old_history(
    client: anthropic.Anthropic,
) -> None:
    first = client.messages.with_raw_response.create(
        model="veil", max_tokens=50, messages=[user("Count with me.")]
    )
    sid = first.headers["x-session-id"]
    reply = {"role": "assistant", "content": first.parse().content}
    # The session goes on by its id alone: the history this client holds no longer is it.
    client.messages.create(
        model="veil",
        max_tokens=50,
        messages=[user("One.")],
        extra_headers={"X-Session-Id": sid},
    )
    resent = client.messages.with_raw_response.create(
        model="veil", max_tokens=50, messages=[user("Count with me."), reply, user("Two.")]
    )
    assert resent.headers["x-session-id"] != sid


def test_another_tenant_resending_the_same_words_never_meets_the_session(
    client: anthropic.Anthropic, veil: VeilThread, upstream: FakeOpenAI
) -> None:
    first = client.messages.with_raw_response.create(
        model="veil", max_tokens=50, messages=[user("tenant a's secret plan")]
    )
    sid = first.headers["x-session-id"]
    history = [
        user("tenant a's secret plan"),
        {"role": "assistant", "content": "echo: tenant a's secret plan"},
        user("go on"),
    ]
    with anthropic.Anthropic(base_url=root(veil), api_key=KEY_B, max_retries=0) as b:
        theirs = b.messages.with_raw_response.create(model="veil", max_tokens=50, messages=history)
    assert theirs.headers["x-session-id"] != sid
    mine = client.messages.with_raw_response.create(model="veil", max_tokens=50, messages=history)
    assert mine.headers["x-session-id"] == sid
    # Naming tenant a's session by its id reaches nothing of it either.
    named = post(veil, {"model": "veil", "max_tokens": 50, "messages": [user("and?")]}, key=KEY_B,
                 headers={"X-Session-Id": sid})  # fmt: skip
    assert named.status_code in (200, 404), named.text
    assert "secret plan" not in str(upstream.last_request.body["messages"])


def test_an_idempotent_retry_of_a_resent_history_is_the_same_turn(
    client: anthropic.Anthropic, upstream: FakeOpenAI
) -> None:
    first = client.messages.with_raw_response.create(
        model="veil", max_tokens=50, messages=[user("Retry me.")]
    )
    history = [
        user("Retry me."),
        {"role": "assistant", "content": first.parse().content},
        user("Again."),
    ]
    headers = {"Idempotency-Key": "anthropic-door-retry-1"}
    once = client.messages.with_raw_response.create(
        model="veil", max_tokens=50, messages=history, extra_headers=headers
    )
    calls = len(upstream.requests)
    twice = client.messages.with_raw_response.create(
        model="veil", max_tokens=50, messages=history, extra_headers=headers
    )
    assert len(upstream.requests) == calls  # answered from the session's record
    assert twice.parse().id == once.parse().id
    assert twice.headers["x-session-id"] == once.headers["x-session-id"]
    assert once.headers["x-session-id"] == first.headers["x-session-id"]


# --- parameters ----------------------------------------------------------------------------------


def test_the_system_prompt_as_text_or_blocks(
    client: anthropic.Anthropic, upstream: FakeOpenAI
) -> None:
    client.messages.create(
        model="veil", max_tokens=50, system="Answer briefly.", messages=[user("hi")]
    )
    assert upstream.last_request.body["messages"][0] == {
        "role": "system",
        "content": PERSONA + "\n\nAnswer briefly.",
    }
    client.messages.create(
        model="veil",
        max_tokens=50,
        system=[{"type": "text", "text": "Be kind."}, {"type": "text", "text": "Be short."}],
        messages=[user("hi")],
    )
    assert upstream.last_request.body["messages"][0]["content"] == (
        PERSONA + "\n\nBe kind.\n\nBe short."
    )


def test_stop_sequences_max_tokens_and_sampling_reach_the_engine(
    client: anthropic.Anthropic, upstream: FakeOpenAI
) -> None:
    message = client.messages.create(
        model="veil",
        max_tokens=2,
        stop_sequences=["END", "###"],
        # This SDK no longer names them; the API (and Veil) still take them.
        extra_body={"temperature": 0.5, "top_p": 0.9},
        messages=[user("a long answer please")],
    )
    sent = upstream.last_request.body
    assert sent["stop"] == ["END", "###"] and sent["max_tokens"] == 2
    assert sent["temperature"] == 0.5 and sent["top_p"] == 0.9
    assert message.stop_reason == "max_tokens"
    assert message.content[0].type == "text" and message.content[0].text == "echo: a"


def test_metadata_user_id_is_the_memory_user(veil: VeilThread, upstream: FakeOpenAI) -> None:
    with anthropic.Anthropic(base_url=root(veil), api_key=KEY_A, max_retries=0) as client:
        said = client.messages.with_raw_response.create(
            model="veil",
            max_tokens=50,
            metadata={"user_id": "carol"},
            messages=[user("my locker code is tangerine-hovercraft")],
        )
        sid = said.headers["x-session-id"]
        opened = [e for e in veil.events(sid, "tenant-a") if isinstance(e, SessionOpened)]
        assert [e.user_id for e in opened] == ["carol"]
        veil.wait_for_memory()
        # Carol's next conversation recalls it; another user's does not.
        for who, recalls in (("carol", True), ("dave", False)):
            asked = client.messages.with_raw_response.create(
                model="veil",
                max_tokens=50,
                metadata={"user_id": who},
                messages=[user("what is my locker code?")],
            )
            assert asked.headers["x-session-id"] != sid
            prompt = upstream.last_request.body["messages"][0]["content"]
            assert ("tangerine-hovercraft" in prompt) is recalls, prompt


def test_a_key_pinned_to_a_user_may_not_name_another(veil: VeilThread) -> None:
    with anthropic.Anthropic(base_url=root(veil), api_key=KEY_ANN, max_retries=0) as client:
        assert client.messages.create(
            model="veil", max_tokens=50, metadata={"user_id": "ann"}, messages=[user("hi")]
        ).content
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            client.messages.create(
                model="veil", max_tokens=50, metadata={"user_id": "bob"}, messages=[user("hi")]
            )
    assert refused.value.body["error"]["type"] == "permission_error"


def test_count_tokens_estimates_characters_over_four(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(
        model="veil",
        system="Be brief.",
        messages=[user("How many tokens is this?")],
        tools=[WEATHER],
    )
    schema = json.dumps(WEATHER["input_schema"], separators=(",", ":"))
    chars = len("Be brief.") + len("How many tokens is this?")
    chars += len("get_weather") + len("The weather in a city.") + len(schema)
    assert counted.input_tokens == math.ceil(chars / 4)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=[user("x")])
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.count_tokens(model="veil", messages=[user("x"), user("y")] * 1025)
    assert refused.value.body["error"]["type"] == "invalid_request_error"


# --- tools ---------------------------------------------------------------------------------------


def _weather(body: dict[str, Any]) -> str | ToolCalls:
    """The model asks for the weather until the tool's answer is in the conversation."""
    for m in body["messages"]:
        if m.get("role") == "tool" or (  # OpenAI's tool message, or Anthropic's tool_result
            m.get("role") == "user"
            and isinstance(m.get("content"), list)
            and any(b.get("type") == "tool_result" for b in m["content"])
        ):
            return "It is sunny in Paris."
    return ToolCalls([("get_weather", {"city": "Paris"})], text="Let me look.")


@pytest.mark.parametrize("model", ["veil", "veil-claude"])
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_a_tool_use_round_trip(
    client: anthropic.Anthropic,
    upstream: FakeOpenAI,
    claude: FakeAnthropic,
    model: str,
    streamed: bool,
) -> None:
    upstream.reply = claude.reply = _weather
    history: list[Any] = [user("Weather in Paris?")]

    def ask() -> tuple[anthropic.types.Message, str]:
        if streamed:
            with client.messages.stream(
                model=model,
                max_tokens=100,
                tools=[WEATHER],
                messages=history,
            ) as stream:
                return stream.get_final_message(), stream.response.headers["x-session-id"]
        raw = client.messages.with_raw_response.create(
            model=model,
            max_tokens=100,
            tools=[WEATHER],
            messages=history,
        )
        return raw.parse(), raw.headers["x-session-id"]

    asked, sid = ask()
    assert asked.stop_reason == "tool_use"
    text, call = asked.content
    assert text.type == "text" and text.text == "Let me look."
    assert call.type == "tool_use" and call.name == "get_weather"
    assert call.input == {"city": "Paris"}
    history += [
        {"role": "assistant", "content": asked.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C"}],
        },
    ]
    answered, same = ask()
    assert same == sid and answered.stop_reason == "end_turn"
    assert answered.content[0].type == "text"
    assert answered.content[0].text == "It is sunny in Paris."
    sent = (upstream if model == "veil" else claude).last_request.body["messages"]
    if model == "veil":
        assert sent[-2]["tool_calls"][0]["id"] == call.id
        assert sent[-1] == {"role": "tool", "content": "18 C", "tool_call_id": call.id}
    else:
        assert sent[-1]["content"][0]["tool_use_id"] == call.id
    assert sum(m["role"] == "assistant" for m in sent) == 1  # the call is there once


def test_an_anthropic_client_on_an_anthropic_upstream(
    client: anthropic.Anthropic, claude: FakeAnthropic
) -> None:
    message = client.messages.create(
        model="veil-claude",
        max_tokens=64,
        system="Answer briefly.",
        stop_sequences=["END"],
        messages=[user("hello claude")],
    )
    assert message.content[0].type == "text" and message.content[0].text == "echo: hello claude"
    sent = claude.last_request.body
    assert sent["model"] == "claude-upstream" and sent["max_tokens"] == 64
    assert sent["system"] == PERSONA + "\n\nAnswer briefly."
    assert sent["stop_sequences"] == ["END"]
    assert sent["messages"] == [{"role": "user", "content": "hello claude"}]
    with client.messages.stream(
        model="veil-claude", max_tokens=64, messages=[user("stream claude")]
    ) as stream:
        assert "".join(stream.text_stream) == "echo: stream claude"


# --- errors --------------------------------------------------------------------------------------


def _error_of(raised: pytest.ExceptionInfo[anthropic.APIStatusError]) -> dict[str, Any]:
    body = raised.value.body
    assert isinstance(body, dict) and body["type"] == "error" and set(body) == {"type", "error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"type", "message"} and error["message"]
    return error


def test_errors_come_in_anthropics_shape(veil: VeilThread, client: anthropic.Anthropic) -> None:
    wrong = anthropic.Anthropic(base_url=root(veil), api_key="sk-wrong", max_retries=0)
    with wrong, pytest.raises(anthropic.AuthenticationError) as unknown_key:
        wrong.messages.create(model="veil", max_tokens=10, messages=[user("hi")])
    assert _error_of(unknown_key)["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as no_model:
        client.messages.create(model="no-such-model", max_tokens=10, messages=[user("hi")])
    assert _error_of(no_model)["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(
            model="veil", max_tokens=10, messages=[user("hi")], extra_body={"top_k": 5}
        )
    assert _error_of(bad)["type"] == "invalid_request_error"
    assert "top_k" in _error_of(bad)["message"]
    with pytest.raises(anthropic.BadRequestError) as image:
        client.messages.create(
            model="veil",
            max_tokens=10,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
                        }
                    ],
                }
            ],
        )
    assert "image" in _error_of(image)["message"]
    missing = requests.post(
        f"{root(veil)}/v1/messages", json={"model": "veil"}, timeout=30
    )  # and no key at all
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    lost = requests.post(
        f"{root(veil)}/v1/messages/nope", json={}, headers={"x-api-key": KEY_A}, timeout=30
    )
    assert lost.status_code == 404 and lost.json()["error"]["type"] == "not_found_error"


def test_a_rate_limit_is_anthropics_429_with_retry_after(veil: VeilThread) -> None:
    with anthropic.Anthropic(base_url=root(veil), api_key=KEY_ONCE, max_retries=0) as client:
        client.messages.create(model="veil", max_tokens=10, messages=[user("first")])
        with pytest.raises(anthropic.RateLimitError) as limited:
            client.messages.create(model="veil", max_tokens=10, messages=[user("second")])
    assert _error_of(limited)["type"] == "rate_limit_error"
    assert int(limited.value.response.headers["retry-after"]) >= 1


def test_upstream_failures_before_and_during_a_stream(
    client: anthropic.Anthropic, upstream: FakeOpenAI
) -> None:
    upstream.inject(Fault(status=500))
    with pytest.raises(anthropic.InternalServerError) as before:
        client.messages.create(model="veil", max_tokens=10, messages=[user("fail")])
    assert before.value.status_code == 502 and _error_of(before)["type"] == "api_error"
    upstream.inject(Fault(break_after=2))
    stream = client.messages.stream(
        model="veil", max_tokens=100, messages=[user("one two three four five")]
    )
    with pytest.raises(anthropic.APIStatusError) as during, stream as events:
        for _ in events.text_stream:  # an `error` event comes after the first pieces
            pass
    assert _error_of(during)["type"] == "api_error"


# --- keys ----------------------------------------------------------------------------------------


def test_keys_in_x_api_key_or_a_bearer_header(
    veil: VeilThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    by_header = anthropic.Anthropic(
        base_url=root(veil), api_key=None, default_headers={"x-api-key": KEY_A}, max_retries=0
    )
    by_bearer = anthropic.Anthropic(base_url=root(veil), auth_token=KEY_A, max_retries=0)
    for client in (by_header, by_bearer):
        with client:
            assert client.messages.create(model="veil", max_tokens=10, messages=[user("k")]).id
    plain = {"model": "veil", "max_tokens": 10, "messages": [user("k")]}
    assert post(veil, plain).status_code == 200  # x-api-key, no anthropic-version needed
    assert post(veil, plain, headers={"anthropic-version": "1999-01-01"}).status_code == 200
    assert post(veil, plain, key="sk-wrong").status_code == 401
    # The chat door keeps to OpenAI's Bearer header.
    chat = requests.post(
        f"{veil.base_url}/chat/completions",
        json={"model": "veil", "messages": [user("k")]},
        headers={"x-api-key": KEY_A},
        timeout=30,
    )
    assert chat.status_code == 401 and "error" in chat.json() and "type" in chat.json()["error"]


# --- abuse ---------------------------------------------------------------------------------------


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"a": value}
    return value


BAD_BODIES: list[tuple[str, Any]] = [
    ("no max_tokens", {"model": "veil", "messages": [user("x")]}),
    ("max_tokens zero", {"model": "veil", "max_tokens": 0, "messages": [user("x")]}),
    ("max_tokens a string", {"model": "veil", "max_tokens": "ten", "messages": [user("x")]}),
    ("no messages", {"model": "veil", "max_tokens": 5, "messages": []}),
    ("messages not a list", {"model": "veil", "max_tokens": 5, "messages": "hi"}),
    ("a system role", {"model": "veil", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
    ("content a number", {"model": "veil", "max_tokens": 5, "messages": [{"role": "user", "content": 42}]}),
    ("an unknown block", {"model": "veil", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "video"}]}]}),
    ("temperature past 1", {"model": "veil", "max_tokens": 5, "temperature": 1.5, "messages": [user("x")]}),
    ("five stop sequences", {"model": "veil", "max_tokens": 5, "stop_sequences": list("abcde"), "messages": [user("x")]}),
    ("a bad tool name", {"model": "veil", "max_tokens": 5, "tools": [{**WEATHER, "name": "no spaces!"}], "messages": [user("x")]}),
    ("a server tool", {"model": "veil", "max_tokens": 5, "tools": [{"type": "web_search_20250305", "name": "web_search"}], "messages": [user("x")]}),
    ("a bogus tool choice", {"model": "veil", "max_tokens": 5, "tool_choice": {"type": "bogus"}, "messages": [user("x")]}),
    ("a long user id", {"model": "veil", "max_tokens": 5, "metadata": {"user_id": "u" * 300}, "messages": [user("x")]}),
    ("an assistant message last", {"model": "veil", "max_tokens": 5, "messages": [user("x"), {"role": "assistant", "content": "y"}]}),
    ("tool_use from the user", {"model": "veil", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}]}),
    ("tool_result from the assistant", {"model": "veil", "max_tokens": 5, "messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t1"}]}, user("x")]}),
    ("a tool_result answering nothing", {"model": "veil", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t9", "content": "x"}]}]}),
    ("too many blocks", {"model": "veil", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 257}]}),
    ("too many messages", {"model": "veil", "max_tokens": 5, "messages": [user("x")] * 2049}),
    ("tool input nested deep", {"model": "veil", "max_tokens": 5, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": _nested(100)}]}, user("x")]}),
    ("a tool schema nested deep", {"model": "veil", "max_tokens": 5, "tools": [{**WEATHER, "input_schema": _nested(100)}], "messages": [user("x")]}),
    ("an image in a tool result", {"model": "veil", "max_tokens": 5, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "image", "source": {}}]}]}]}),
    ("not an object", [1, 2, 3]),
]  # fmt: skip


@pytest.mark.parametrize(("why", "body"), BAD_BODIES, ids=[w for w, _ in BAD_BODIES])
def test_bad_requests_are_400s_in_anthropics_shape(veil: VeilThread, why: str, body: Any) -> None:
    before = log_position(veil)
    reply = post(veil, body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["type"] == "error"
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert log_position(veil) == before  # nothing was recorded


def test_hostile_bodies_are_refused_never_a_500(veil: VeilThread) -> None:
    before = log_position(veil)
    # Past what a decoder recurses into (a tool input 5,000 objects deep), and arrays
    # where messages belong.
    tool_use = b'{"type": "tool_use", "id": "t1", "name": "f", "input": '
    tool_use += b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}"
    deep = b'{"model": "veil", "max_tokens": 5, "messages": [{"role": "assistant", "content": ['
    deep += tool_use + b']}, {"role": "user", "content": "x"}]}'
    arrays = b'{"model": "veil", "max_tokens": 5, "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    for body in (deep, arrays):
        refused = post(veil, body)
        assert refused.status_code == 400 and refused.json()["type"] == "error", refused.text
    assert post(veil, b"{not json").status_code == 400
    assert post(veil, b"").status_code == 400
    huge = {"model": "veil", "max_tokens": 5, "messages": [user("x" * 300_000)]}
    too_large = post(veil, huge)
    assert too_large.status_code == 413
    assert too_large.json()["error"]["type"] == "request_too_large"
    form = post(veil, b"model=veil", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415 and form.json()["type"] == "error"
    assert log_position(veil) == before
