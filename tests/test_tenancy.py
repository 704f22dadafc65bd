"""Two tenants never meet: every endpoint, tried by one tenant's chat and audit keys on the
other tenant's data, reads, searches, deletes, replays and bills nothing of it.

Every route of the gateway must be listed in ROUTES with how it is kept apart, so an
endpoint added later fails here until someone says (and tests) how tenants stay apart."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from config import ApiKey, Config, EngineConfig, MemoryConfig, ModelConfig, PipelineConfig
from edge.app import create_app
from edge.responses_wire import response_id
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread
from tests.test_gateway import http

A_CHAT, A_AUDIT = "sk-tenancy-a-chat", "sk-tenancy-a-audit"
B_CHAT, B_AUDIT = "sk-tenancy-b-chat", "sk-tenancy-b-audit"
SECRET_WORDS = "marmalade-zeppelin"

# How each route keeps tenants apart:
#   session: a session-scoped read or change; another tenant's id answers as a free one (404)
#     (session ids are per tenant: a chat turn naming one opens the caller's own session)
#   conversation: a session read or changed as a conversation; another tenant's id answers
#     as a free one (404), with a valid body for the changes (a bad body is a 400 first)
#   response: a response id names a session and a turn, looked up under the caller's
#     tenant: another tenant's answers as a free one (404)
#   admin: admin keys only (global by design); chat and audit keys get 403
#   tenant: lists only the caller's tenant (checked by its own test below)
#   public: no tenant data at all
ROUTES: dict[tuple[str, str], str] = {
    ("POST", "/v1/chat/completions"): "tenant",
    ("POST", "/v1/messages"): "tenant",
    ("POST", "/v1/messages/count_tokens"): "tenant",
    ("POST", "/v1/responses"): "tenant",
    ("GET", "/v1/responses/{response_id}"): "response",
    ("DELETE", "/v1/responses/{response_id}"): "response",
    ("GET", "/v1/responses/{response_id}/input_items"): "response",
    ("GET", "/v1/models"): "public",
    ("GET", "/v1/models/{model}"): "public",
    ("GET", "/v1/sessions/{session_id}"): "session",
    ("DELETE", "/v1/sessions/{session_id}"): "session",
    ("GET", "/v1/sessions/{session_id}/messages"): "session",
    ("GET", "/v1/sessions/{session_id}/memories"): "session",
    ("GET", "/v1/sessions/{session_id}/turns"): "session",
    ("GET", "/v1/sessions/{session_id}/turns/{turn_id}"): "session",
    ("POST", "/v1/conversations"): "tenant",
    ("GET", "/v1/conversations/{conversation_id}"): "conversation",
    ("POST", "/v1/conversations/{conversation_id}"): "conversation",
    ("DELETE", "/v1/conversations/{conversation_id}"): "conversation",
    ("GET", "/v1/conversations/{conversation_id}/items"): "conversation",
    ("POST", "/v1/conversations/{conversation_id}/items"): "conversation",
    ("GET", "/v1/conversations/{conversation_id}/items/{item_id}"): "conversation",
    ("DELETE", "/v1/conversations/{conversation_id}/items/{item_id}"): "conversation",
    ("GET", "/healthz"): "public",
    ("GET", "/metrics"): "admin",
    ("GET", "/v1/usage"): "tenant",
    ("GET", "/openapi.json"): "public",
    ("GET", "/docs"): "public",
    ("GET", "/docs/{asset}"): "public",
    ("GET", "/v1/knowledge"): "admin",
    ("GET", "/v1/knowledge/{collection}/documents"): "admin",
    ("POST", "/v1/knowledge/{collection}/documents"): "admin",
    ("DELETE", "/v1/knowledge/{collection}/documents"): "admin",
    ("POST", "/v1/admin/keys"): "admin",
    ("GET", "/v1/admin/keys"): "admin",
    ("GET", "/v1/admin/keys/{key_id}"): "admin",
    ("DELETE", "/v1/admin/keys/{key_id}"): "admin",
    ("PATCH", "/v1/admin/keys/{key_id}"): "admin",
    ("POST", "/v1/admin/keys/{key_id}/rotate"): "admin",
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _config(nats_url: str, upstream: FakeOpenAI) -> Config:
    return Config(
        keys=[
            ApiKey(key=A_CHAT, tenant="a"),
            ApiKey(key=A_AUDIT, tenant="a", scopes=["audit"]),
            ApiKey(key=B_CHAT, tenant="b"),
            ApiKey(key=B_AUDIT, tenant="b", scopes=["audit"]),
        ],
        engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
        pipelines={"default": PipelineConfig(engine="up", model="m")},
        models=[ModelConfig(name="veil", pipeline="default")],
        memory=MemoryConfig(enabled=True),
        nats_url=nats_url,
    )


@pytest.fixture(scope="module")
def veil(nats_url: str, upstream: FakeOpenAI) -> Iterator[VeilThread]:
    with VeilThread(_config(nats_url, upstream), nats_url) as server:
        yield server


def chat(veil: VeilThread, key: str, text: str, sid: str | None = None) -> Any:
    """A turn for the end user "ann": both tenants have a user of that name."""
    with openai.OpenAI(base_url=veil.base_url, api_key=key, max_retries=0) as client:
        return client.chat.completions.create(
            model="veil",
            messages=[{"role": "user", "content": text}],
            extra_body={"session_id": sid} if sid else None,
            user="ann",
        )


def call(veil: VeilThread, method: str, path: str, key: str) -> tuple[int, dict[str, Any]]:
    reply = http(
        method,
        veil.base_url.removesuffix("/v1") + path,
        headers={"Authorization": f"Bearer {key}"},
    )
    try:
        return reply.status_code, reply.json()
    except ValueError:  # not JSON (the metrics page): keep the text
        return reply.status_code, {"text": reply.body.decode(errors="replace")}


@pytest.fixture(scope="module")
def a_session(veil: VeilThread) -> tuple[str, str]:
    """Tenant a's session (id, one turn id), with words no one else says."""
    reply = chat(veil, A_CHAT, f"my code word is {SECRET_WORDS}")
    veil.wait_for_memory()
    return str(reply.model_extra["session_id"]), reply.id.removeprefix("chatcmpl-")


def test_every_route_says_how_tenants_stay_apart(nats_url: str, upstream: FakeOpenAI) -> None:
    app = create_app(_config(nats_url, upstream), nats_url)
    routes = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    assert routes - ROUTES.keys() == set(), "add the new routes to ROUTES, and test them"
    assert ROUTES.keys() - routes == set(), "routes listed here that the gateway lacks"


def _fill(path: str, sid: str, turn_id: str) -> str:
    return (
        path.replace("{session_id}", sid)
        .replace("{turn_id}", turn_id)
        .replace("{model}", "veil")
        .replace("{collection}", "docs")
        .replace("{key_id}", "key_0000000000000000")
    )


@pytest.mark.parametrize(
    ("method", "path"), [k for k, v in ROUTES.items() if v == "session"], ids=str
)
def test_another_tenants_session_answers_as_a_free_id(
    veil: VeilThread, a_session: tuple[str, str], method: str, path: str
) -> None:
    sid, turn_id = a_session
    query = "?q=marmalade" if path.endswith("/memories") else ""
    for key in (B_CHAT, B_AUDIT):
        status, body = call(veil, method, _fill(path, sid, turn_id) + query, key)
        free_status, free = call(veil, method, _fill(path, "sess_free", turn_id) + query, key)
        if status == 403:  # an audit key may not delete: refused before any lookup
            assert method == "DELETE" and key == B_AUDIT and free_status == 403
            continue
        assert status == free_status == 404, (status, body)
        assert body["error"]["code"] == free["error"]["code"] == "session_not_found"
        assert body["error"]["message"] == free["error"]["message"].replace("sess_free", sid)
        assert SECRET_WORDS not in str(body)
    # And tenant a still has all of it.
    status, body = call(veil, "GET", f"/v1/sessions/{sid}/messages", A_AUDIT)
    assert status == 200 and SECRET_WORDS in str(body)


# A valid body for each conversation change, so that only the lookup can refuse it.
_CONVERSATION_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/conversations/{conversation_id}"): {"metadata": {"k": "v"}},
    ("POST", "/v1/conversations/{conversation_id}/items"): {
        "items": [{"type": "message", "role": "user", "content": "mine now"}]
    },
}


@pytest.mark.parametrize(
    ("method", "path"), [k for k, v in ROUTES.items() if v == "conversation"], ids=str
)
def test_another_tenants_conversation_answers_as_a_free_id(
    veil: VeilThread, a_session: tuple[str, str], method: str, path: str
) -> None:
    sid = a_session[0]
    body = _CONVERSATION_BODIES.get((method, path))
    root = veil.base_url.removesuffix("/v1")

    def ask(conversation: str, key: str) -> tuple[int, dict[str, Any]]:
        url = path.replace("{conversation_id}", conversation).replace("{item_id}", "msg_0")
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        data = json.dumps(body).encode() if body is not None else None
        reply = http(method, root + url, data, headers)
        return reply.status_code, reply.json()

    for key in (B_CHAT, B_AUDIT):
        status, answer = ask(sid, key)
        free_status, free = ask("sess_free", key)
        if status == 403:  # an audit key may not change: refused before any lookup
            assert method != "GET" and key == B_AUDIT and free_status == 403
            continue
        assert status == free_status == 404, (status, answer)
        assert answer["error"]["code"] == free["error"]["code"] == "conversation_not_found"
        assert answer["error"]["message"] == free["error"]["message"].replace("sess_free", sid)
        assert SECRET_WORDS not in str(answer)
    # And tenant a still has all of it, unchanged.
    status, items = call(veil, "GET", f"/v1/conversations/{sid}/items?order=asc", A_AUDIT)
    assert status == 200 and SECRET_WORDS in str(items) and len(items["data"]) == 2
    assert call(veil, "GET", f"/v1/conversations/{sid}", A_AUDIT)[1]["metadata"] == {}


@pytest.mark.parametrize(
    ("method", "path"), [k for k, v in ROUTES.items() if v == "response"], ids=str
)
def test_another_tenants_response_answers_as_a_free_id(
    veil: VeilThread, a_session: tuple[str, str], method: str, path: str
) -> None:
    sid, turn_id = a_session
    theirs, free = response_id(sid, turn_id), response_id("sess_free", turn_id)
    for key in (B_CHAT, B_AUDIT):
        status, body = call(veil, method, path.replace("{response_id}", theirs), key)
        free_status, none = call(veil, method, path.replace("{response_id}", free), key)
        if status == 403:  # an audit key may not delete: refused before any lookup
            assert method == "DELETE" and key == B_AUDIT and free_status == 403
            continue
        assert status == free_status == 404, (status, body)
        assert body["error"]["code"] == none["error"]["code"] == "response_not_found"
        assert body["error"]["message"] == none["error"]["message"].replace(free, theirs)
        assert SECRET_WORDS not in str(body)
    # And tenant a reads it (a chat turn is a response of its session too).
    status, body = call(veil, "GET", f"/v1/responses/{theirs}", A_AUDIT)
    assert status == 200 and SECRET_WORDS in str(body)


@pytest.mark.parametrize(
    ("method", "path"), [k for k, v in ROUTES.items() if v == "admin"], ids=str
)
def test_admin_routes_refuse_chat_and_audit_keys(
    veil: VeilThread, a_session: tuple[str, str], method: str, path: str
) -> None:
    for key in (B_CHAT, B_AUDIT, A_CHAT, A_AUDIT):
        status, body = call(veil, method, _fill(path, *a_session), key)
        assert status == 403 and body["error"]["code"] == "missing_scope", (key, body)


def test_a_turn_on_another_tenants_session_name_opens_the_callers_own(
    veil: VeilThread, upstream: FakeOpenAI
) -> None:
    """Session names are per tenant: naming another tenant's session opens one's own under
    that name, exactly as a free name does, and nothing of the other tenant's is seen."""
    theirs = str(chat(veil, A_CHAT, f"my code word is {SECRET_WORDS}").model_extra["session_id"])
    veil.wait_for_memory()
    answers = []
    for name in (theirs, f"sess_free_{uuid.uuid4().hex}"):
        reply = chat(veil, B_CHAT, "what was the code word?", name)
        assert reply.model_extra["session_id"] == name
        assert SECRET_WORDS not in str(upstream.last_request.body["messages"])
        status, view = call(veil, "GET", f"/v1/sessions/{name}", B_CHAT)
        assert status == 200, view
        status, listed = call(veil, "GET", f"/v1/sessions/{name}/messages", B_AUDIT)
        assert status == 200 and SECRET_WORDS not in str(listed)
        answers.append((reply.choices[0].message.content, view["turns"], len(listed["data"])))
    assert answers[0] == answers[1] == ("echo: what was the code word?", 1, 2)
    status, kept = call(veil, "GET", f"/v1/sessions/{theirs}/messages", A_AUDIT)
    assert status == 200 and len(kept["data"]) == 2 and SECRET_WORDS in str(kept)
    # Deleting b's session of that name leaves a's as it was.
    assert call(veil, "DELETE", f"/v1/sessions/{theirs}", B_CHAT)[0] == 200
    assert call(veil, "GET", f"/v1/sessions/{theirs}", B_CHAT)[0] == 404
    assert call(veil, "GET", f"/v1/sessions/{theirs}", A_CHAT)[1]["turns"] == 1


def test_long_term_memory_never_recalls_another_tenants_words(
    veil: VeilThread, upstream: FakeOpenAI, a_session: tuple[str, str]
) -> None:
    chat(veil, A_CHAT, "what is my code word?")
    assert SECRET_WORDS in str(upstream.last_request.body["messages"]), "a's own recall works"
    chat(veil, B_CHAT, "what is my code word?")
    assert SECRET_WORDS not in str(upstream.last_request.body["messages"])


def test_usage_shows_each_tenant_only_its_own(veil: VeilThread, a_session: tuple[str, str]) -> None:
    chat(veil, B_CHAT, "hello from b")

    def rows(key: str, query: str = "") -> list[dict[str, Any]]:
        for _ in range(100):  # the ledger trails the log by a moment
            status, body = call(veil, "GET", f"/v1/usage?group_by=tenant,key{query}", key)
            assert status == 200, body
            found = [r for b in body["data"] for r in b["results"]]
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError("no usage appeared")

    for key, tenant in ((A_CHAT, "a"), (A_AUDIT, "a"), (B_CHAT, "b"), (B_AUDIT, "b")):
        assert {r["project_id"] for r in rows(key)} == {tenant}, key
    a_key = rows(A_CHAT)[0]["api_key_id"]
    for key in (B_CHAT, B_AUDIT):
        for query in ("&tenant=a", f"&key_id={a_key}"):
            status, body = call(veil, "GET", f"/v1/usage?group_by=tenant{query}", key)
            # Refused, or (an audit key naming a key id) the empty answer of any unknown key.
            empty = status == 200 and all(not b["results"] for b in body["data"])
            assert empty or (status in (403, 404) and "error" in body), (key, query, body)
            assert "sk-tenancy" not in str(body)
