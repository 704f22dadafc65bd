"""GET /openapi.json and GET /docs: the API's description, made from the gateway's own
types, checked against the app's routes and against real answers; the docs page
rendered by a real headless Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import requests
from openapi_spec_validator import validate

from config import (
    ApiKey,
    Config,
    EngineConfig,
    MemoryConfig,
    ModelConfig,
    PipelineConfig,
    ServerConfig,
)
from edge.app import create_app
from edge.openai_wire import ChatRequest
from edge.openapi import RATE_LIMIT_HEADERS, build_document, described
from edge.responses import ChatCompletion
from testkit.api_schema import check_headers, check_response, closed
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread

CHAT_PATH = "/v1/chat/completions"

ADMIN = "sk-openapi-admin"
CHAT = "sk-openapi-chat"
LIMITED = "sk-openapi-one-a-minute"


@pytest.fixture(scope="module")
def veil(nats_url: str) -> Iterator[VeilThread]:
    with FakeOpenAI() as upstream:
        config = Config(
            server=ServerConfig(turn_timeout=30, accept_timeout=30),
            keys=[
                # Limits far away: their x-ratelimit-* headers go on the chat answers.
                ApiKey(key=ADMIN, tenant="t", admin=True, rpm=10**6, tpm=10**9),
                ApiKey(key=CHAT, tenant="t"),
                ApiKey(key=LIMITED, tenant="t3", rpm=1),
            ],
            engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
            pipelines={"default": PipelineConfig(engine="up", model="m", retries=0)},
            models=[ModelConfig(name="veil", pipeline="default")],
            nats_url=nats_url,
            memory=MemoryConfig(enabled=False),
        )
        with VeilThread(config, nats_url) as server:
            yield server


class Http:
    """Requests to one gateway over real HTTP, each with a timeout."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session = requests.Session()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(method, self.base + path, timeout=30, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)


@pytest.fixture(scope="module")
def http(veil: VeilThread) -> Iterator[Http]:
    client = Http(veil.port)
    yield client
    client.session.close()


@pytest.fixture(scope="module")
def doc(http: Http) -> dict[str, Any]:
    reply = http.get("/openapi.json")  # no key: a description, not data
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/json")
    document: dict[str, Any] = reply.json()
    return document


def _auth(key: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # raises on any departure from the OpenAPI 3.1 schema
    # The refs the validator does not follow: each names a component that exists.
    refs = {m for m in _refs(doc)}
    for ref in refs:
        section, name = ref.removeprefix("#/components/").split("/")
        assert name in doc["components"][section], ref


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_every_route_of_the_app_is_described(doc: dict[str, Any]) -> None:
    """Walks the router: a route added without `@operation` on its handler fails here."""
    app = create_app(Config(), "nats://127.0.0.1:1")  # never started: only its routes
    missing = []
    for route in app.router.routes():
        if route.method == "HEAD":
            continue  # aiohttp's own, beside each GET
        assert route.resource is not None
        path, method = route.resource.canonical, route.method.lower()
        if described(route.handler) is None or method not in doc["paths"].get(path, {}):
            missing.append(f"{route.method} {path} ({route.handler.__name__})")
    assert not missing, (
        "routes without a description: declare each with @operation (edge/openapi.py) "
        f"next to its handler: {missing}"
    )
    # And nothing described that the app does not serve.
    served = {(r.resource.canonical, r.method.lower()) for r in app.router.routes() if r.resource}
    for path, item in doc["paths"].items():
        for method in item:
            assert (path, method) in served, (method, path)


def test_schemas_are_msgspecs_own(doc: dict[str, Any]) -> None:
    """The request and response schemas are what msgspec makes of the types the gateway
    decodes and encodes with: no copy kept by hand."""
    _, made = msgspec.json.schema_components(
        [ChatRequest, ChatCompletion], ref_template="#/components/schemas/{name}"
    )
    for name, schema in made.items():
        assert doc["components"]["schemas"][name] == schema, name
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatRequest"
    }
    assert "session_id" in doc["components"]["schemas"]["ChatRequest"]["properties"]
    assert build_document(create_app(Config(), "nats://127.0.0.1:1")) == doc


def test_errors_headers_and_security_are_described(doc: dict[str, Any]) -> None:
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert doc["security"] == [{"bearerAuth": []}]
    error = {"$ref": "#/components/schemas/ErrorBody"}
    for status, response in doc["components"]["responses"].items():
        assert response["content"]["application/json"]["schema"] == error, status
    limited = doc["components"]["responses"]["429"]["headers"]
    assert set(limited) == {"Retry-After", *RATE_LIMIT_HEADERS}
    assert set(RATE_LIMIT_HEADERS) == {
        f"x-ratelimit-{what}-{unit}"
        for what in ("limit", "remaining", "reset")
        for unit in ("requests", "tokens")
    }
    open_paths = {"/openapi.json", "/docs", "/docs/{asset}", "/healthz"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if path in open_paths:
                assert op["security"] == [], (method, path)  # no key needed
                assert "401" not in op["responses"], (method, path)
            else:
                assert "security" not in op, (method, path)  # the document's: bearer
                assert {"401", "403"} <= set(op["responses"]), (method, path)
            # Only what passes the rate limiter may answer 429, and carries its headers.
            ok = next(r for s, r in op["responses"].items() if s.startswith("2"))
            limited = "429" in op["responses"]
            carries = set(RATE_LIMIT_HEADERS) <= set(ok.get("headers", {}))
            assert limited == carries, (method, path)
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "403", "404", "429", "503"} <= set(chat["responses"])
    headers = {p["name"] for p in chat["parameters"] if p["in"] == "header"}
    assert {"X-Session-Id", "Idempotency-Key"} <= headers
    assert "X-Session-Id" in chat["responses"]["200"]["headers"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    sessions = doc["paths"]["/v1/sessions/{session_id}"]["get"]
    assert {"401", "403", "404", "503"} <= set(sessions["responses"])


def _json(reply: requests.Response) -> Any:
    return reply.json()


def test_real_answers_match_the_schema(veil: VeilThread, http: Http, doc: Any) -> None:
    """Every kind of answer, read from the running gateway, against the document with
    unknown fields refused (a key added to a dict alone fails here)."""
    strict = closed(doc)
    seen: list[tuple[str, str, int]] = []
    headers: dict[tuple[str, str, int], set[str]] = {}  # those seen, by answer

    def check(reply: requests.Response, template: str) -> requests.Response:
        method = reply.request.method
        assert method is not None
        check_response(
            strict,
            template,
            method,
            reply.status_code,
            reply.headers.get("content-type", ""),
            reply.content,
        )
        headers.setdefault((method, template, reply.status_code), set()).update(
            check_headers(strict, template, method, reply.status_code, reply.headers)
        )
        seen.append((method, template, reply.status_code))
        return reply

    one = {"model": "veil", "messages": [{"role": "user", "content": "hello"}]}
    done = check(
        http.post("/v1/chat/completions", json=one, headers=_auth()), "/v1/chat/completions"
    )
    assert done.status_code == 200
    sid = done.json()["session_id"]
    streamed = check(
        http.post(
            "/v1/chat/completions",
            json={
                **one,
                "stream": True,
                "stream_options": {"include_usage": True},
                "session_id": sid,
            },
            headers=_auth(),
        ),
        "/v1/chat/completions",
    )
    assert streamed.status_code == 200 and streamed.headers["x-session-id"] == sid
    for status, body, key in [
        (400, {"model": "veil", "messages": []}, ADMIN),
        (400, {**one, "temperature": 3}, ADMIN),
        (404, {**one, "model": "nope"}, ADMIN),
        (401, one, "sk-wrong"),
    ]:
        reply = check(
            http.post("/v1/chat/completions", json=body, headers=_auth(key)), "/v1/chat/completions"
        )
        assert reply.status_code == status, reply.text
    reply = check(http.get("/v1/models", headers=_auth()), "/v1/models")
    assert [m["id"] for m in reply.json()["data"]] == ["veil"]
    check(http.get("/v1/models/veil", headers=_auth()), "/v1/models/{model}")
    check(http.get("/v1/models/nope", headers=_auth()), "/v1/models/{model}")
    base = f"/v1/sessions/{sid}"
    check(http.get(base, headers=_auth()), "/v1/sessions/{session_id}")
    check(http.get(f"{base}/messages", headers=_auth()), "/v1/sessions/{session_id}/messages")
    check(
        http.get(f"{base}/memories?q=hello", headers=_auth()), "/v1/sessions/{session_id}/memories"
    )
    check(http.get(f"{base}/memories", headers=_auth()), "/v1/sessions/{session_id}/memories")
    turns = check(http.get(f"{base}/turns", headers=_auth()), "/v1/sessions/{session_id}/turns")
    assert turns.status_code == 200 and len(turns.json()["data"]) == 2
    turn_id = turns.json()["data"][0]["id"]
    check(
        http.get(f"{base}/turns/{turn_id}", headers=_auth()),
        "/v1/sessions/{session_id}/turns/{turn_id}",
    )
    check(http.get("/v1/sessions/sess_none", headers=_auth()), "/v1/sessions/{session_id}")
    made = check(
        http.post("/v1/admin/keys", json={"tenant": "t", "name": "n", "rpm": 60}, headers=_auth()),
        "/v1/admin/keys",
    )
    assert made.status_code == 201 and made.json()["key"]
    key_id = made.json()["id"]
    check(http.get("/v1/admin/keys", headers=_auth()), "/v1/admin/keys")
    check(http.get(f"/v1/admin/keys/{key_id}", headers=_auth()), "/v1/admin/keys/{key_id}")
    check(
        http.patch(f"/v1/admin/keys/{key_id}", json={"tpm": 1000}, headers=_auth()),
        "/v1/admin/keys/{key_id}",
    )
    check(
        http.post(f"/v1/admin/keys/{key_id}/rotate", headers=_auth()),
        "/v1/admin/keys/{key_id}/rotate",
    )
    check(http.delete(f"/v1/admin/keys/{key_id}", headers=_auth()), "/v1/admin/keys/{key_id}")
    check(http.get("/v1/admin/keys", headers=_auth(CHAT)), "/v1/admin/keys")  # 403
    check(http.get("/v1/knowledge", headers=_auth()), "/v1/knowledge")
    check(
        http.post(
            "/v1/knowledge/handbook/documents",
            files={"file": ("faq.md", b"# FAQ\n\nVeil keeps sessions.\n")},
            headers=_auth(),
        ),
        "/v1/knowledge/{collection}/documents",
    )
    check(
        http.get("/v1/knowledge/handbook/documents", headers=_auth()),
        "/v1/knowledge/{collection}/documents",
    )
    check(
        http.delete("/v1/knowledge/handbook/documents?path=faq.md", headers=_auth()),
        "/v1/knowledge/{collection}/documents",
    )
    check(http.delete(base, headers=_auth()), "/v1/sessions/{session_id}")
    check(http.get("/healthz"), "/healthz")
    check(http.get("/docs/nothing.js"), "/docs/{asset}")
    # A key of one request a minute: its second is a 429 with Retry-After.
    for _ in range(2):
        limited = check(
            http.post("/v1/chat/completions", json=one, headers=_auth(LIMITED)),
            "/v1/chat/completions",
        )
    assert limited.status_code == 429 and "Retry-After" in headers[("POST", CHAT_PATH, 429)]
    statuses = {s for _, _, s in seen}
    assert {200, 201, 400, 401, 403, 404, 429} <= statuses, seen
    # The rate limit headers, on the answers of a key with limits, read as documented.
    assert set(RATE_LIMIT_HEADERS) <= headers[("POST", CHAT_PATH, 200)]
    assert "X-Session-Id" in headers[("POST", CHAT_PATH, 200)]


def test_docs_page_ships_its_own_files(http: Http) -> None:
    page = http.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # Only its own files: no other site is named, and the policy lets none in.
    assert "http://" not in page.text and "https://" not in page.text and "//" not in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    # The operations are not in the page as served: only its script writes them.
    assert "chat/completions" not in page.text
    for name, media in [("docs.js", "text/javascript"), ("docs.css", "text/css")]:
        asset = http.get(f"/docs/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media)
        assert "https://" not in asset.text and "http://" not in asset.text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_docs_page_renders_in_a_headless_browser(veil: VeilThread) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    with tempfile.TemporaryDirectory(prefix="veil-chromium-") as profile:
        dom = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                f"--user-data-dir={profile}",
                # Lets the page's fetch and rendering finish before the DOM is dumped
                # (virtual time: it waits for the network, not for the clock).
                "--virtual-time-budget=10000",
                "--dump-dom",
                f"http://127.0.0.1:{veil.port}/docs",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # Written by docs.js from /openapi.json, never in the page as served.
    assert 'data-rendered="' in html and 'data-rendered="error"' not in html, html[-2000:]
    assert 'id="op-chat_completions"' in html
    assert "/v1/chat/completions" in html and "Create a chat completion" in html
    assert "ChatRequest" in html and "session_id" in html and "X-Session-Id" in html
    operations = sum(
        len(item)
        for item in json.loads(
            requests.get(f"http://127.0.0.1:{veil.port}/openapi.json", timeout=30).text
        )["paths"].values()
    )
    assert f'data-rendered="{operations}"' in html


def test_a_field_the_types_do_not_name_fails_the_check(doc: dict[str, Any]) -> None:
    """The guard of the answers still built as dicts: a key added to one and not to its
    type in edge/responses.py is refused (and so is a missing one, or a wrong type)."""
    key = {
        "id": "key_1",
        "object": "api_key",
        "hint": "sk-veil-abcd…",
        "tenant": "t",
        "name": None,
        "scopes": ["chat"],
        "models": [],
        "user": None,
        "created_at": 1,
        "expires_at": None,
        "revoked_at": None,
        "rotated_at": None,
        "rpm": None,
        "tpm": None,
        "concurrency": None,
        "budget_tokens": None,
        "budget_usd": None,
        "budget_period": "month",
    }
    strict = closed(doc)
    path = "/v1/admin/keys/{key_id}"

    def answer(body: dict[str, Any]) -> None:
        check_response(strict, path, "GET", 200, "application/json", json.dumps(body).encode())

    answer(key)
    for wrong in ({**key, "digest": "ab"}, {k: v for k, v in key.items() if k != "hint"}):
        with pytest.raises(AssertionError):
            answer(wrong)
    with pytest.raises(AssertionError):  # an answer the document does not list
        check_response(strict, path, "GET", 418, "application/json", b"{}")
