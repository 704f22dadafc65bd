"""The Responses door (POST /v1/responses, GET/DELETE /v1/responses/{id}, input_items): the
official openai SDK, unmodified, over real HTTP, through real NATS actors, to a fake OpenAI
upstream on loopback."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import nats
import openai
import pytest
import requests
from msgspec import to_builtins as msgspec_dump

from config import ApiKey, Config, EngineConfig, ModelConfig, PipelineConfig
from config.schema import ServerConfig
from edge.responses_wire import (
    MAX_ITEMS,
    parse_response_id,
    parse_responses_request,
    response_id,
    to_chat_request,
)
from testkit.api_schema import check_response, closed
from testkit.upstreams import FakeOpenAI, Fault, ToolCalls
from tests.harness import VeilThread

KEY_A = "sk-responses-door-a"
KEY_B = "sk-responses-door-b"
PERSONA = "You are Veil, a careful assistant."
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
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
def veil(nats_url: str, upstream: FakeOpenAI) -> Iterator[VeilThread]:
    config = Config(
        server=ServerConfig(max_body_bytes=256 * 1024, turn_timeout=30, accept_timeout=30),
        keys=[ApiKey(key=KEY_A, tenant="tenant-a"), ApiKey(key=KEY_B, tenant="tenant-b")],
        engines={
            "up": EngineConfig(
                kind="openai", base_url=upstream.base_url, api_key="sk-upstream", timeout=5.0
            )
        },
        pipelines={
            "default": PipelineConfig(
                engine="up", model="upstream-model", system_prompt=PERSONA, retries=0
            )
        },
        models=[ModelConfig(name="veil", pipeline="default")],
        nats_url=nats_url,
    )
    with VeilThread(config, nats_url) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean_fake(upstream: FakeOpenAI) -> None:
    upstream.reset()
    upstream.reply = None


@pytest.fixture
def client(veil: VeilThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=veil.base_url, api_key=KEY_A, max_retries=0, timeout=30) as c:
        yield c


def sent_messages(upstream: FakeOpenAI) -> list[dict[str, Any]]:
    return list(upstream.last_request.body["messages"])


def texts(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m.get("content") or "") for m in messages if m["role"] != "system"]


def session_of(response: Any) -> str:
    return str(response.model_extra["session_id"])


def turns(veil: VeilThread, sid: str) -> int:
    reply = requests.get(
        f"{veil.base_url}/sessions/{sid}",
        headers={"Authorization": f"Bearer {KEY_A}"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    return int(reply.json()["turns"])


def post(veil: VeilThread, body: Any, key: str = KEY_A) -> requests.Response:
    return requests.post(
        f"{veil.base_url}/responses",
        data=body if isinstance(body, bytes) else json.dumps(body),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=30,
    )


def log_position(veil: VeilThread) -> int:
    async def last() -> int:
        nc = await nats.connect(veil.nats_url)
        try:
            return int((await nc.jetstream().stream_info("CHAT_EVENTS")).state.last_seq)
        finally:
            await nc.close()

    return veil.call(last())


# --- ids (pure) ------------------------------------------------------------------------------


def test_a_response_id_names_its_session_and_turn_and_nothing_else_parses() -> None:
    rid = response_id("sess_my-chat_1", "idem_0123abcd")
    assert rid.startswith("resp_")
    ref = parse_response_id(rid)
    assert ref is not None and (ref.session_id, ref.turn_id) == ("sess_my-chat_1", "idem_0123abcd")
    for bad in ("resp_", "resp_!!!", "msg_abc", "resp_" + "A" * 2000, "resp_c2Vzcw"):
        assert parse_response_id(bad) is None, bad


def test_input_items_become_the_chat_messages_the_engines_take() -> None:
    body = {
        "model": "veil",
        "instructions": "Be kind.",
        "input": [
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {
                "type": "message",
                "role": "assistant",
                "id": "msg_1",
                "status": "completed",
                "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}],
            },
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sun"},
            {"type": "function_call_output", "call_id": "c2", "output": [
                {"type": "input_text", "text": "rain"}
            ]},
        ],
        "tools": [{**WEATHER, "strict": True}],
        "tool_choice": {"type": "function", "name": "get_weather"},
    }  # fmt: skip
    chat = to_chat_request(parse_responses_request(json.dumps(body).encode()), None)
    got = [(m.role, m.content, [c.id for c in m.tool_calls or ()]) for m in chat.messages]
    assert got == [
        ("system", "Be kind.", []),
        ("system", "Answer in English.", []),
        ("user", "Weather?", []),
        ("assistant", "Let me look.", ["c1", "c2"]),
        ("tool", "sun", []),
        ("tool", "rain", []),
    ]
    assert [m.tool_call_id for m in chat.messages[-2:]] == ["c1", "c2"]
    assert chat.tools == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": WEATHER["description"],
                "parameters": WEATHER["parameters"],
                "strict": True,
            },
        }
    ]
    assert chat.tool_choice == {"type": "function", "function": {"name": "get_weather"}}


# --- creating responses -------------------------------------------------------------------------


def test_a_string_input_with_instructions(client: openai.OpenAI, upstream: FakeOpenAI) -> None:
    response = client.responses.create(
        model="veil", input="Hello there", instructions="Answer in French.", temperature=0.5
    )
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == "echo: Hello there"
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    usage = response.usage
    assert usage is not None and usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens > 0
    assert response.instructions == "Answer in French." and response.temperature == 0.5
    sent = sent_messages(upstream)
    assert "Answer in French." in str([m for m in sent if m["role"] == "system"])
    assert texts(sent) == [("user", "Hello there")]
    assert upstream.last_request.body["temperature"] == 0.5


def test_input_items_and_max_output_tokens(client: openai.OpenAI, upstream: FakeOpenAI) -> None:
    response = client.responses.create(
        model="veil",
        input=[
            {"role": "developer", "content": "Be terse."},
            {"role": "user", "content": [{"type": "input_text", "text": "Hi, "}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "B"}]},
        ],
        max_output_tokens=64,
        metadata={"topic": "greeting"},
        user="ann",
    )
    assert response.output_text == "echo: B"
    assert response.metadata == {"topic": "greeting"} and response.user == "ann"
    sent = sent_messages(upstream)
    assert texts(sent) == [("user", "Hi, "), ("user", "B")]
    assert "Be terse." in str([m for m in sent if m["role"] == "system"])
    assert upstream.last_request.body.get("max_tokens", 0) <= 64


def test_previous_response_id_continues_its_session(
    veil: VeilThread, client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    first = client.responses.create(model="veil", input="My name is Ann.")
    second = client.responses.create(model="veil", input="Who am I?", previous_response_id=first.id)
    assert session_of(second) == session_of(first)
    assert second.previous_response_id == first.id
    assert texts(sent_messages(upstream)) == [
        ("user", "My name is Ann."),
        ("assistant", "echo: My name is Ann."),
        ("user", "Who am I?"),
    ]
    assert turns(veil, session_of(first)) == 2
    # The first is no longer the latest: a session is one line, not a tree.
    before = len(upstream.requests)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="veil", input="Again?", previous_response_id=first.id)
    assert refused.value.code == "previous_response_not_latest"
    assert second.id in str(refused.value.body)
    assert len(upstream.requests) == before and turns(veil, session_of(first)) == 2


def test_a_failed_turn_does_not_end_the_line(
    veil: VeilThread, client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    """A turn that failed added nothing to the session: its previous response is still
    the one to continue from."""
    first = client.responses.create(model="veil", input="Keep this.")
    upstream.inject(Fault(status=500))
    with pytest.raises(openai.APIStatusError) as failed:
        client.responses.create(model="veil", input="lost", previous_response_id=first.id)
    assert failed.value.status_code >= 500
    second = client.responses.create(model="veil", input="Still?", previous_response_id=first.id)
    assert session_of(second) == session_of(first)
    assert texts(sent_messages(upstream)) == [
        ("user", "Keep this."),
        ("assistant", "echo: Keep this."),
        ("user", "Still?"),
    ]


def test_conversation_names_a_session(veil: VeilThread, client: openai.OpenAI) -> None:
    name = f"conv_{uuid.uuid4().hex}"
    one = client.responses.create(model="veil", input="one", conversation=name)
    two = client.responses.create(model="veil", input="two", conversation={"id": name})
    assert session_of(one) == session_of(two) == name
    assert two.conversation is not None and two.conversation.id == name
    assert turns(veil, name) == 2


def test_a_resent_conversation_is_recognised_as_its_session(
    veil: VeilThread, client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    history: list[Any] = [{"role": "user", "content": "I'm Bob."}]
    first = client.responses.create(model="veil", input=history, store=False)
    assert first.store is False
    history += [item.model_dump(exclude_none=True) for item in first.output]
    history.append({"role": "user", "content": "Who am I?"})
    second = client.responses.create(model="veil", input=history, store=False)
    assert session_of(second) == session_of(first)
    assert turns(veil, session_of(first)) == 2
    # The session held the start: only the new message was added, the model saw it all.
    assert texts(sent_messages(upstream)) == [
        ("user", "I'm Bob."),
        ("assistant", "echo: I'm Bob."),
        ("user", "Who am I?"),
    ]
    # An edited history is another conversation: a new session.
    history[0] = {"role": "user", "content": "I'm Rob."}
    third = client.responses.create(model="veil", input=history, store=False)
    assert session_of(third) != session_of(first)


def test_cut_by_max_output_tokens_is_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="veil", input="one two three four five six seven eight", max_output_tokens=2
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert client.responses.retrieve(response.id).status == "incomplete"


def test_a_retry_under_an_idempotency_key_is_the_same_response(
    veil: VeilThread, client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    key = {"Idempotency-Key": f"responses-{uuid.uuid4().hex}"}
    first = client.responses.create(model="veil", input="only once", extra_headers=key)
    again = client.responses.create(model="veil", input="only once", extra_headers=key)
    assert again.id == first.id and again.output_text == first.output_text
    assert len(upstream.requests) == 1 and turns(veil, session_of(first)) == 1


# --- streaming ----------------------------------------------------------------------------------

TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def _collapsed(types: list[str]) -> list[str]:
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


def test_streamed_with_the_sdks_helper(client: openai.OpenAI, upstream: FakeOpenAI) -> None:
    upstream.reply = "The quick brown fox."
    with client.responses.stream(model="veil", input="Tell me") as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert _collapsed(types) == TEXT_EVENTS
    assert types.count("response.output_text.delta") > 1
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == "The quick brown fox."
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers))
    assert final.status == "completed" and final.usage is not None
    assert final.id == events[0].response.id  # type: ignore[union-attr]


def test_streamed_with_stream_true(client: openai.OpenAI, veil: VeilThread) -> None:
    stream = client.responses.create(model="veil", input="Stream me", stream=True)
    events = list(stream)
    assert _collapsed([e.type for e in events]) == TEXT_EVENTS
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.output_text == "echo: Stream me"
    # The streamed response is in the log like any other.
    again = openai.OpenAI(base_url=veil.base_url, api_key=KEY_A, max_retries=0).responses
    assert again.retrieve(done.response.id).output_text == "echo: Stream me"


def test_a_stream_that_fails_midway_ends_with_response_failed(
    client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    upstream.reply = "one two three four five"
    upstream.inject(Fault(break_after=2))
    events = list(client.responses.create(model="veil", input="go", stream=True))
    assert events[0].type == "response.created"
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.status == "failed" and failed.response.error is not None


# --- tools ----------------------------------------------------------------------------------------


def _weather(body: dict[str, Any]) -> str | ToolCalls:
    if any(m.get("role") == "tool" for m in body["messages"]):
        return "It is sunny in Paris."
    return ToolCalls([("get_weather", {"city": "Paris"})], text="Let me look.")


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_a_function_tool_round_trip(
    client: openai.OpenAI, upstream: FakeOpenAI, streamed: bool
) -> None:
    upstream.reply = _weather

    def ask(**kwargs: Any) -> Any:
        if not streamed:
            return client.responses.create(model="veil", tools=[WEATHER], **kwargs)
        with client.responses.stream(model="veil", tools=[WEATHER], **kwargs) as stream:
            events = list(stream)
            final = stream.get_final_response()
        if any(item.type == "function_call" for item in final.output):
            kinds = {e.type for e in events}
            assert "response.function_call_arguments.delta" in kinds
            assert "response.function_call_arguments.done" in kinds
        return final

    asked = ask(input="Weather in Paris?", tool_choice="auto")
    assert asked.output_text == "Let me look."
    message, call = asked.output
    assert message.type == "message"
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    tools = upstream.last_request.body["tools"]
    assert tools[0]["function"]["name"] == "get_weather"
    answered = ask(
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}],
        previous_response_id=asked.id,
    )
    assert answered.output_text == "It is sunny in Paris."
    sent = sent_messages(upstream)
    assert sent[-2]["tool_calls"][0]["id"] == call.call_id
    assert sent[-1] == {"role": "tool", "content": "18 C", "tool_call_id": call.call_id}


def test_a_resent_tool_round_trip_stays_in_its_session(
    veil: VeilThread, client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    """A store: false client resends its input and every output item, calls included."""
    upstream.reply = _weather
    history: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    asked = client.responses.create(model="veil", input=history, tools=[WEATHER], store=False)
    history += [item.model_dump(exclude_none=True) for item in asked.output]
    call = asked.output[-1]
    assert call.type == "function_call"
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": "18 C"})
    answered = client.responses.create(model="veil", input=history, tools=[WEATHER], store=False)
    assert answered.output_text == "It is sunny in Paris."
    assert session_of(answered) == session_of(asked) and turns(veil, session_of(asked)) == 2
    items = client.responses.input_items.list(answered.id, order="asc")
    assert [i.type for i in items.data] == ["function_call_output"]


# --- reading back ----------------------------------------------------------------------------------


def test_retrieve_input_items_and_delete(client: openai.OpenAI, veil: VeilThread) -> None:
    made = client.responses.create(
        model="veil", input="Remember the lighthouse.", instructions="Short answers."
    )
    got = client.responses.retrieve(made.id)
    assert got.id == made.id and got.output_text == made.output_text
    assert got.status == "completed" and got.instructions == "Short answers."
    assert got.usage is not None and made.usage is not None
    assert got.usage.total_tokens == made.usage.total_tokens
    items = client.responses.input_items.list(made.id)
    assert [(i.type, i.role) for i in items.data] == [("message", "user")]  # type: ignore[union-attr]
    assert items.data[0].content[0].text == "Remember the lighthouse."  # type: ignore[union-attr]
    deleted = requests.delete(
        f"{veil.base_url}/responses/{made.id}",
        headers={"Authorization": f"Bearer {KEY_A}"},
        timeout=30,
    )
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"id": made.id, "object": "response", "deleted": True}
    for read in (client.responses.retrieve, client.responses.input_items.list):
        with pytest.raises(openai.NotFoundError) as gone:
            read(made.id)  # type: ignore[operator]
        assert gone.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError) as twice:
        client.responses.delete(made.id)
    assert twice.value.code == "response_not_found"


def test_a_deleted_response_leaves_the_history_the_model_sees(
    client: openai.OpenAI, veil: VeilThread, upstream: FakeOpenAI
) -> None:
    conv = client.conversations.create()
    upstream.reply = "Kept."
    first = client.responses.create(model="veil", conversation=conv.id, input="Say kept.")
    upstream.reply = "The code word is heron."
    second = client.responses.create(model="veil", conversation=conv.id, input="Code word?")
    upstream.reply = None
    assert client.responses.delete(second.id) is None  # the SDK answers None for a 200
    items = client.conversations.items.list(conv.id, order="asc")
    said = [(i.role, i.content[0].text) for i in items.data]  # type: ignore[union-attr]
    assert said == [("user", "Say kept."), ("assistant", "Kept.")]
    # The next turn's prompt carries the first turn, not the deleted one.
    client.responses.create(model="veil", previous_response_id=first.id, input="And now?")
    prompt = texts(sent_messages(upstream))
    assert prompt == [("user", "Say kept."), ("assistant", "Kept."), ("user", "And now?")]
    assert "heron" not in json.dumps(upstream.last_request.body)
    # A deleted response cannot be continued.
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="veil", previous_response_id=second.id, input="x")
    assert refused.value.code == "previous_response_not_found"
    # Its words stay in the log until the session is deleted.
    assert any("heron" in json.dumps(msgspec_dump(e)) for e in veil.events(session_of(second)))


def test_a_delete_sent_while_a_turn_runs_waits_for_it_in_the_sessions_mailbox(
    client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    """One worker runs a session's commands one at a time: the deletion is decided after
    the running turn closed (`decide` refuses it while a turn is open: a 409 when another
    worker holds the turn, tests/actors/test_conversation_edits.py)."""
    made = client.responses.create(model="veil", input="First.")
    gate = upstream.hold()
    done: dict[str, Any] = {}

    def later() -> None:
        done["next"] = client.responses.create(
            model="veil", previous_response_id=made.id, input="Next."
        )

    def delete() -> None:
        done["deleted"] = client.responses.delete(made.id)

    turn = threading.Thread(target=later)
    turn.start()
    deleting = threading.Thread(target=delete)
    try:
        deadline = time.monotonic() + 30
        while upstream.pending() < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert upstream.pending() == 1
        deleting.start()
        deleting.join(0.5)
        assert "deleted" not in done  # it waits behind the running turn
    finally:
        gate.set()
        turn.join(30)
        deleting.join(30)
    assert done["next"].status == "completed" and "deleted" in done
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)
    assert client.responses.retrieve(done["next"].id).status == "completed"


def test_unknown_and_other_tenants_responses_are_alike(
    veil: VeilThread, client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    mine = client.responses.create(model="veil", input="secret: marmalade")
    ref = parse_response_id(mine.id)
    assert ref is not None
    free = response_id("sess_free_responses_door", ref.turn_id)
    headers = {"Authorization": f"Bearer {KEY_B}"}
    for path in ("", "/input_items"):
        for method in ("GET", "DELETE") if not path else ("GET",):
            theirs = requests.request(
                method, f"{veil.base_url}/responses/{mine.id}{path}", headers=headers, timeout=30
            )
            none = requests.request(
                method, f"{veil.base_url}/responses/{free}{path}", headers=headers, timeout=30
            )
            assert theirs.status_code == none.status_code == 404, theirs.text
            assert theirs.json()["error"] == {
                **none.json()["error"],
                "message": none.json()["error"]["message"].replace(free, mine.id),
            }
            assert "marmalade" not in theirs.text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope")
    # Continuing another tenant's response: refused as a free id is, and no model is asked.
    before = len(upstream.requests)
    answers = []
    for previous in (mine.id, free):
        reply = post(veil, {"model": "veil", "input": "x", "previous_response_id": previous}, KEY_B)
        assert reply.status_code == 400
        error = reply.json()["error"]
        answers.append({**error, "message": error["message"].replace(previous, "ID")})
    assert answers[0] == answers[1] and answers[0]["code"] == "previous_response_not_found"
    assert len(upstream.requests) == before


# --- refusals -------------------------------------------------------------------------------------


def _deep(levels: int) -> Any:
    value: Any = "x"
    for _ in range(levels):
        value = [value]
    return value


REFUSED = {
    "both previous_response_id and conversation": {
        "model": "veil",
        "input": "x",
        "previous_response_id": response_id("s", "t"),
        "conversation": "c",
    },
    "too many items": {
        "model": "veil",
        "input": [{"role": "user", "content": "x"}] * (MAX_ITEMS + 1),
    },
    "a deep item": {
        "model": "veil",
        "input": [{"role": "user", "content": "x", "extra": _deep(200)}],
    },
    "deeper than the parser goes": b'{"model": "veil", "input": '
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}",
    "an image": {
        "model": "veil",
        "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}],
    },
    "a web search tool": {"model": "veil", "input": "x", "tools": [{"type": "web_search"}]},
    "an unknown item": {"model": "veil", "input": [{"type": "reasoning", "summary": []}]},
    "a bad conversation id": {"model": "veil", "input": "x", "conversation": "a.b"},
    "no input": {"model": "veil"},
    "empty input": {"model": "veil", "input": []},
    "temperature": {"model": "veil", "input": "x", "temperature": 3},
    "background": {"model": "veil", "input": "x", "background": True},
    "not JSON": b"{nope",
    "a bad tool choice": {"model": "veil", "input": "x", "tool_choice": {"type": "x"}},
    "a function_call_output without its call": {
        "model": "veil",
        "input": [{"type": "function_call_output", "output": "x"}],
    },
}


@pytest.mark.parametrize("body", REFUSED.values(), ids=REFUSED.keys())
def test_client_mistakes_are_400s_and_write_nothing(
    veil: VeilThread, upstream: FakeOpenAI, body: Any
) -> None:
    before = log_position(veil)
    reply = post(veil, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert log_position(veil) == before and not upstream.requests


# --- the document ---------------------------------------------------------------------------------


def test_real_answers_match_the_document(veil: VeilThread, upstream: FakeOpenAI) -> None:
    """Each kind of answer of these routes, against /openapi.json with unknown fields refused."""
    root = veil.base_url.removesuffix("/v1")
    doc = closed(requests.get(f"{root}/openapi.json", timeout=30).json())
    auth = {"Authorization": f"Bearer {KEY_A}"}

    def check(reply: requests.Response, template: str, status: int) -> requests.Response:
        assert reply.status_code == status, reply.text
        method = reply.request.method
        assert method is not None
        content_type = reply.headers.get("content-type", "")
        check_response(doc, template, method, status, content_type, reply.content)
        return reply

    made = check(post(veil, {"model": "veil", "input": "hello"}), "/v1/responses", 200)
    rid = made.json()["id"]
    upstream.reply = ToolCalls([("get_weather", {"city": "Paris"})], text="Let me look.")
    streamed = post(veil, {"model": "veil", "input": "hi", "stream": True, "tools": [WEATHER]})
    check(streamed, "/v1/responses", 200)
    assert b"response.function_call_arguments.done" in streamed.content
    check(post(veil, {"model": "veil", "input": []}), "/v1/responses", 400)
    one = f"{veil.base_url}/responses/{rid}"
    check(requests.get(one, headers=auth, timeout=30), "/v1/responses/{response_id}", 200)
    items = requests.get(f"{one}/input_items?order=asc&limit=1", headers=auth, timeout=30)
    check(items, "/v1/responses/{response_id}/input_items", 200)
    check(requests.delete(one, headers=auth, timeout=30), "/v1/responses/{response_id}", 200)
    check(requests.delete(one, headers=auth, timeout=30), "/v1/responses/{response_id}", 404)
    free = f"{veil.base_url}/responses/resp_none"
    check(requests.get(free, headers=auth, timeout=30), "/v1/responses/{response_id}", 404)
