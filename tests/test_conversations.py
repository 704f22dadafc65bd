"""/v1/conversations on Veil's sessions: the official openai SDK, unmodified, over real HTTP,
through real NATS actors, to a fake OpenAI upstream on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import requests

from config import ApiKey, Config, EngineConfig, ModelConfig, PipelineConfig
from config.schema import ServerConfig
from testkit.api_schema import check_response, closed
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread
from tests.test_responses_door import log_position

KEY_A = "sk-conversations-a"
KEY_B = "sk-conversations-b"


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
        pipelines={"default": PipelineConfig(engine="up", model="upstream-model", retries=0)},
        models=[ModelConfig(name="veil", pipeline="default")],
        nats_url=nats_url,
    )
    with VeilThread(config, nats_url) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean_fake(upstream: FakeOpenAI) -> None:
    upstream.reset()
    upstream.reply = None


def _client(veil: VeilThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=veil.base_url, api_key=key, max_retries=0, timeout=30)


@pytest.fixture
def client(veil: VeilThread) -> Iterator[openai.OpenAI]:
    with _client(veil, KEY_A) as c:
        yield c


@pytest.fixture
def other(veil: VeilThread) -> Iterator[openai.OpenAI]:
    with _client(veil, KEY_B) as c:
        yield c


def said(role: str, text: str) -> dict[str, Any]:
    return {"type": "message", "role": role, "content": text}


def texts(items: Any) -> list[tuple[str, str]]:
    return [(i.role, "".join(c.text for c in i.content)) for i in items]


def sent(upstream: FakeOpenAI) -> list[tuple[str, str]]:
    messages = upstream.last_request.body["messages"]
    return [(m["role"], m.get("content") or "") for m in messages if m["role"] != "system"]


def call(veil: VeilThread, method: str, path: str, body: Any = None, key: str = KEY_A) -> Any:
    return requests.request(
        method,
        f"{veil.base_url}{path}",
        data=body if body is None or isinstance(body, bytes) else json.dumps(body),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=30,
    )


def test_a_conversation_is_created_with_items_without_calling_a_model(
    client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    made = client.conversations.create(
        items=[said("user", "My name is Ada."), said("assistant", "Hello Ada.")],
        metadata={"topic": "names"},
    )
    assert made.id.startswith("conv_") and made.object == "conversation"
    assert made.metadata == {"topic": "names"}
    assert not upstream.requests
    got = client.conversations.retrieve(made.id)
    assert (got.id, got.created_at, got.metadata) == (made.id, made.created_at, made.metadata)
    items = client.conversations.items.list(made.id, order="asc")
    assert [i.id for i in items.data] == ["msg_0", "msg_1"]
    assert texts(items.data) == [("user", "My name is Ada."), ("assistant", "Hello Ada.")]
    assert items.data[1].content[0].type == "output_text"
    empty = client.conversations.create()
    assert empty.metadata == {} and client.conversations.items.list(empty.id).data == []


def test_responses_with_the_conversation_see_its_items(
    client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    conv = client.conversations.create(items=[said("user", "The code word is heron.")])
    client.conversations.items.create(conv.id, items=[said("assistant", "Noted: heron.")])
    answer = client.responses.create(model="veil", conversation=conv.id, input="The word?")
    assert answer.conversation is not None and answer.conversation.id == conv.id
    assert answer.model_extra is not None and answer.model_extra["session_id"] == conv.id
    assert sent(upstream) == [
        ("user", "The code word is heron."),
        ("assistant", "Noted: heron."),
        ("user", "The word?"),
    ]
    # The turn's messages are items of the conversation too, after the added ones.
    items = client.conversations.items.list(conv.id, order="asc")
    assert texts(items.data) == [
        ("user", "The code word is heron."),
        ("assistant", "Noted: heron."),
        ("user", "The word?"),
        ("assistant", "echo: The word?"),
    ]
    assert [i.id for i in items.data] == ["msg_0", "msg_1", "msg_2", "msg_3"]


def test_a_session_is_a_conversation(
    veil: VeilThread, client: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    first = client.responses.create(model="veil", input="hi")
    sid = str(first.model_extra["session_id"]) if first.model_extra else ""
    conv = client.conversations.retrieve(sid)
    assert conv.id == sid and conv.metadata == {}
    assert texts(client.conversations.items.list(sid, order="asc").data) == [
        ("user", "hi"),
        ("assistant", "echo: hi"),
    ]


def test_metadata_is_replaced(client: openai.OpenAI) -> None:
    conv = client.conversations.create(metadata={"a": "1", "b": "2"})
    updated = client.conversations.update(conv.id, metadata={"c": "3"})
    assert updated.id == conv.id and updated.metadata == {"c": "3"}
    assert client.conversations.retrieve(conv.id).metadata == {"c": "3"}


def test_items_are_added_retrieved_and_deleted(client: openai.OpenAI, upstream: FakeOpenAI) -> None:
    conv = client.conversations.create(items=[said("user", "one")])
    added = client.conversations.items.create(
        conv.id, items=[said("assistant", "two"), said("user", "three")]
    )
    assert [i.id for i in added.data] == ["msg_1", "msg_2"]
    assert (added.first_id, added.last_id, added.has_more) == ("msg_1", "msg_2", False)
    item = client.conversations.items.retrieve("msg_1", conversation_id=conv.id)
    assert item.type == "message" and texts([item]) == [("assistant", "two")]
    after = client.conversations.items.delete("msg_1", conversation_id=conv.id)
    assert after.id == conv.id and after.object == "conversation"
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve("msg_1", conversation_id=conv.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.delete("msg_1", conversation_id=conv.id)
    listed = client.conversations.items.list(conv.id, order="asc")
    assert [i.id for i in listed.data] == ["msg_0", "msg_2"]
    # The deleted item is out of what the model sees; numbers are never given out again.
    client.responses.create(model="veil", conversation=conv.id, input="four")
    assert sent(upstream) == [("user", "one"), ("user", "three"), ("user", "four")]
    listed = client.conversations.items.list(conv.id, order="asc")
    assert [i.id for i in listed.data] == ["msg_0", "msg_2", "msg_3", "msg_4"]


def test_items_page_with_after_limit_and_order(client: openai.OpenAI) -> None:
    words = ["a", "b", "c", "d", "e"]
    conv = client.conversations.create(items=[said("user", w) for w in words])
    page = client.conversations.items.list(conv.id, limit=2, order="asc")
    assert [i.id for i in page.data] == ["msg_0", "msg_1"] and page.has_more
    # The SDK's own paging follows last_id through every page.
    every = list(client.conversations.items.list(conv.id, limit=2, order="asc"))
    assert [t for _, t in texts(every)] == words
    newest = client.conversations.items.list(conv.id, limit=2)
    assert [i.id for i in newest.data] == ["msg_4", "msg_3"]
    rest = client.conversations.items.list(conv.id, limit=10, after="msg_3")
    assert [i.id for i in rest.data] == ["msg_2", "msg_1", "msg_0"] and not rest.has_more


def test_deleting_a_conversation_forgets_its_session(
    veil: VeilThread, client: openai.OpenAI
) -> None:
    conv = client.conversations.create(items=[said("user", "secret")])
    deleted = client.conversations.delete(conv.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (conv.id, "conversation.deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.list(conv.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.create(conv.id, items=[said("user", "again")])
    assert call(veil, "GET", f"/sessions/{conv.id}").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.conversations.delete(conv.id)


def _refusal(action: Any) -> dict[str, Any]:
    with pytest.raises(openai.NotFoundError) as caught:
        action()
    body = caught.value.body
    assert isinstance(body, dict)
    return body


def _refusals(other: openai.OpenAI, name: str) -> list[dict[str, Any]]:
    attempts = [
        lambda: other.conversations.retrieve(name),
        lambda: other.conversations.update(name, metadata={"x": "y"}),
        lambda: other.conversations.items.list(name),
        lambda: other.conversations.items.create(name, items=[said("user", "mine")]),
        lambda: other.conversations.items.retrieve("msg_0", conversation_id=name),
        lambda: other.conversations.items.delete("msg_0", conversation_id=name),
        lambda: other.conversations.delete(name),
    ]
    return [_refusal(a) for a in attempts]


def test_another_tenants_conversation_answers_as_a_free_id(
    veil: VeilThread, client: openai.OpenAI, other: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    conv = client.conversations.create(items=[said("user", "private")], metadata={"k": "v"})
    free = "conv_nobody_uses_this_one"
    before = log_position(veil)
    for name in (conv.id, free):
        for body in _refusals(other, name):
            assert body["code"] == "conversation_not_found", body
            assert body["message"] == f"No conversation found with id '{name}'."
    assert log_position(veil) == before and not upstream.requests
    assert client.conversations.retrieve(conv.id).metadata == {"k": "v"}
    assert texts(client.conversations.items.list(conv.id).data) == [("user", "private")]


def test_other_tenant_refusals_read_exactly_as_free_ids(veil: VeilThread) -> None:
    conv = call(veil, "POST", "/conversations", {"items": [said("user", "x")]}).json()["id"]
    free = "conv_" + "f" * (len(conv) - 5)
    for method, path, body in [
        ("GET", "/conversations/{}", None),
        ("POST", "/conversations/{}", {"metadata": {}}),
        ("DELETE", "/conversations/{}", None),
        ("GET", "/conversations/{}/items", None),
        ("POST", "/conversations/{}/items", {"items": [said("user", "y")]}),
        ("GET", "/conversations/{}/items/msg_0", None),
        ("DELETE", "/conversations/{}/items/msg_0", None),
    ]:
        theirs = call(veil, method, path.format(conv), body, key=KEY_B)
        nobodys = call(veil, method, path.format(free), body, key=KEY_B)
        assert theirs.status_code == nobodys.status_code == 404
        assert theirs.text.replace(conv, "ID") == nobodys.text.replace(free, "ID")


MISTAKES: list[tuple[str, str, Any]] = [
    ("POST", "/conversations", {"items": [said("user", str(i)) for i in range(21)]}),
    ("POST", "/conversations", {"metadata": {f"k{i}": "v" for i in range(17)}}),
    ("POST", "/conversations", {"metadata": {"k" * 65: "v"}}),
    ("POST", "/conversations", {"metadata": {"k": "v" * 513}}),
    ("POST", "/conversations", {"metadata": {"k": 1}}),
    ("POST", "/conversations", {"items": [said("system", "be terse")]}),
    ("POST", "/conversations", {"items": [{"type": "function_call_output", "call_id": "c"}]}),
    ("POST", "/conversations", {"items": [{"role": "user", "content": [{"type": "input_image"}]}]}),
    ("POST", "/conversations", {"itemz": []}),
    ("POST", "/conversations", b"{not json"),
    ("POST", "/conversations/{}", {"metadata": {f"k{i}": "v" for i in range(17)}}),
    ("POST", "/conversations/{}", {}),
    ("POST", "/conversations/{}/items", {"items": []}),
    ("POST", "/conversations/{}/items", {"items": [said("user", str(i)) for i in range(21)]}),
    ("GET", "/conversations/{}/items?limit=0", None),
    ("GET", "/conversations/{}/items?limit=101", None),
    ("GET", "/conversations/{}/items?order=sideways", None),
    ("GET", "/conversations/{}/items?after=nope", None),
    ("GET", "/conversations/{}/items?after=msg_99", None),
]


@pytest.mark.parametrize(("method", "path", "body"), MISTAKES)
def test_client_mistakes_are_400s_and_write_nothing(
    veil: VeilThread, upstream: FakeOpenAI, method: str, path: str, body: Any
) -> None:
    conv = call(veil, "POST", "/conversations", {"items": [said("user", "x")]}).json()["id"]
    before = log_position(veil)
    reply = call(veil, method, path.format(conv), body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert log_position(veil) == before and not upstream.requests
    assert call(veil, "GET", f"/conversations/{conv}/items").json()["data"][0]["id"] == "msg_0"


def test_the_sdk_raises_bad_request_for_too_many_items(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.conversations.create(items=[said("user", str(i)) for i in range(21)])
    assert caught.value.status_code == 400 and caught.value.param == "items"


def test_real_answers_match_the_document(veil: VeilThread) -> None:
    """Each kind of answer of these routes, against /openapi.json with unknown fields refused."""
    root = veil.base_url.removesuffix("/v1")
    doc = closed(requests.get(f"{root}/openapi.json", timeout=30).json())

    def check(reply: requests.Response, template: str, status: int) -> requests.Response:
        assert reply.status_code == status, reply.text
        method = reply.request.method
        assert method is not None
        content_type = reply.headers.get("content-type", "")
        check_response(doc, template, method, status, content_type, reply.content)
        return reply

    one, items = "/v1/conversations/{conversation_id}", "/v1/conversations/{conversation_id}/items"
    item = items + "/{item_id}"
    made = check(
        call(veil, "POST", "/conversations", {"items": [said("user", "x")]}),
        "/v1/conversations",
        200,
    )
    cid = made.json()["id"]
    check(call(veil, "POST", "/conversations", {"items": 1}), "/v1/conversations", 400)
    check(call(veil, "GET", f"/conversations/{cid}"), one, 200)
    check(call(veil, "POST", f"/conversations/{cid}", {"metadata": {"a": "b"}}), one, 200)
    check(
        call(veil, "POST", f"/conversations/{cid}/items", {"items": [said("assistant", "y")]}),
        items,
        200,
    )
    check(call(veil, "GET", f"/conversations/{cid}/items?limit=1"), items, 200)
    check(call(veil, "GET", f"/conversations/{cid}/items/msg_1"), item, 200)
    check(call(veil, "DELETE", f"/conversations/{cid}/items/msg_1"), item, 200)
    check(call(veil, "GET", f"/conversations/{cid}/items/msg_1"), item, 404)
    check(call(veil, "DELETE", f"/conversations/{cid}"), one, 200)
    check(call(veil, "GET", f"/conversations/{cid}"), one, 404)
