"""API keys managed at run time: created, listed, revoked and rotated over HTTP and with
`veil keys`, stored hashed in a JetStream key-value bucket, seen by every gateway as
they change; scopes and model limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import nats
import openai
import pytest

from bus.subjects import KEYS_BUCKET
from config import ApiKey, Config, EngineConfig, MemoryConfig, ModelConfig, PipelineConfig
from contracts.keys import KEY_RECORD_CODEC
from edge.auth import Authenticator
from edge.keystore import KeyStore
from edge.openai_wire import ApiError
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread
from tests.test_gateway import http

ADMIN = "sk-static-admin"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _config(nats_url: str, upstream: FakeOpenAI, keys: list[ApiKey]) -> Config:
    return Config(
        keys=keys,
        engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
        pipelines={"p": PipelineConfig(engine="up", model="m")},
        models=[ModelConfig(name="veil", pipeline="p"), ModelConfig(name="veil-big", pipeline="p")],
        nats_url=nats_url,
        memory=MemoryConfig(enabled=False),
    )


@pytest.fixture(scope="module")
def veil(nats_url: str, upstream: FakeOpenAI) -> Iterator[VeilThread]:
    keys = [ApiKey(key=ADMIN, tenant="ops", admin=True)]
    with VeilThread(_config(nats_url, upstream, keys), nats_url) as server:
        yield server


def call(
    veil: VeilThread, method: str, path: str, key: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    data = None if body is None else msgspec.json.encode(body)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    reply = http(method, f"{veil.base_url}{path}", data, headers)
    return reply.status_code, reply.json()


def create(veil: VeilThread, **fields: Any) -> dict[str, Any]:
    status, key = call(veil, "POST", "/admin/keys", ADMIN, {"tenant": "acme", **fields})
    assert status == 201, key
    return key


def chat(veil: VeilThread, key: str, model: str = "veil") -> int:
    with openai.OpenAI(base_url=veil.base_url, api_key=key, max_retries=0) as client:
        try:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}]
            )
        except openai.APIStatusError as error:
            return error.status_code
    return 200


def eventually(check: Any, seconds: float = 10.0) -> float:
    """How long `check()` took to become true (fails past `seconds`)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, "it never happened"
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_created_key_works_and_is_stored_hashed(veil: VeilThread) -> None:
    key = create(veil, name="ci")
    secret = key["key"]
    assert secret.startswith("sk-veil-") and key["tenant"] == "acme" and key["scopes"] == ["chat"]
    assert chat(veil, secret) == 200
    status, listed = call(veil, "GET", "/admin/keys?tenant=acme", ADMIN)
    assert status == 200 and key["id"] in {k["id"] for k in listed["data"]}
    assert secret not in str(listed) and "digest" not in str(listed)

    async def raw() -> bytes:
        nc = await nats.connect(veil.nats_url)
        try:
            entry = await (await nc.jetstream().key_value(KEYS_BUCKET)).get(key["id"])
            return entry.value or b""
        finally:
            await nc.close()

    stored = veil.call(raw())
    assert secret.encode() not in stored and b"digest" in stored


def test_a_revoked_key_stops_working_on_every_gateway(veil: VeilThread) -> None:
    key = create(veil)
    assert chat(veil, key["key"]) == 200
    # Another gateway: its own connection, its own watch of the store.
    other = Authenticator(Config(keys=[ApiKey(key=ADMIN, admin=True)]))

    async def watch() -> Any:
        nc = await nats.connect(veil.nats_url)
        store = await KeyStore.open(nc.jetstream())
        task = asyncio.create_task(store.watch(lambda r: r and other.apply(r)))
        return nc, task

    nc, task = veil.call(watch())
    try:
        eventually(lambda: _accepts(other, key["key"]))
        status, revoked = call(veil, "DELETE", f"/admin/keys/{key['id']}", ADMIN)
        assert status == 200 and revoked["revoked"] is True
        here = eventually(lambda: chat(veil, key["key"]) == 401)
        there = eventually(lambda: not _accepts(other, key["key"]))
        print(f"revocation took effect in {here * 1000:.0f} ms here, {there * 1000:.0f} ms there")
    finally:
        task.cancel()
        veil.call(nc.close())
    # The record stays, for audits.
    assert call(veil, "GET", f"/admin/keys/{key['id']}", ADMIN)[1]["revoked_at"] is not None


def _accepts(auth: Authenticator, secret: str) -> bool:
    try:
        auth.authenticate(f"Bearer {secret}")
    except ApiError:
        return False
    return True


def test_rotation_replaces_the_secret(veil: VeilThread) -> None:
    key = create(veil)
    status, rotated = call(veil, "POST", f"/admin/keys/{key['id']}/rotate", ADMIN)
    assert status == 200 and rotated["id"] == key["id"] and rotated["key"] != key["key"]
    eventually(lambda: chat(veil, key["key"]) == 401)
    assert chat(veil, rotated["key"]) == 200


def test_an_expired_key_is_refused(veil: VeilThread) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    key = create(veil, expires_at=past)
    eventually(lambda: _status_code(veil, key["key"]) == "expired_api_key")


def _status_code(veil: VeilThread, secret: str) -> str | None:
    status, body = call(veil, "GET", "/models", secret)
    return body.get("error", {}).get("code") if status == 401 else None


def test_scopes_decide_what_a_key_may_do(veil: VeilThread) -> None:
    chat_key = create(veil)["key"]
    audit_key = create(veil, scopes=["audit"])["key"]
    eventually(lambda: chat(veil, chat_key) == 200)
    with openai.OpenAI(base_url=veil.base_url, api_key=chat_key, max_retries=0) as client:
        sid = client.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": "hi"}]
        ).model_extra["session_id"]
    eventually(lambda: call(veil, "GET", f"/sessions/{sid}", audit_key)[0] == 200)
    assert chat(veil, audit_key) == 403
    status, refused = call(veil, "DELETE", f"/sessions/{sid}", audit_key)
    assert status == 403 and refused["error"]["code"] == "missing_scope"
    for key in (chat_key, audit_key):
        assert call(veil, "POST", "/admin/keys", key, {"tenant": "acme"})[0] == 403
        assert call(veil, "GET", "/admin/keys", key)[0] == 403


def test_a_key_limited_to_some_models_sees_only_those(veil: VeilThread) -> None:
    key = create(veil, models=["veil"])["key"]
    eventually(lambda: chat(veil, key) == 200)
    status, listed = call(veil, "GET", "/models", key)
    assert status == 200 and [m["id"] for m in listed["data"]] == ["veil"]
    assert chat(veil, key, model="veil-big") == 404
    assert call(veil, "GET", "/models/veil-big", key)[0] == 404


def test_bad_key_requests_are_400s(veil: VeilThread) -> None:
    for body in (
        {},
        {"tenant": "a b"},
        {"tenant": "acme", "scopes": ["root"]},
        {"tenant": "acme", "scopes": []},
        {"tenant": 1},
        {"tenant": "acme", "name": "n" * 2_000_000},  # past a JetStream message: never stored
        {"tenant": "acme", "models": ["m"] * 129},
    ):
        status, error = call(veil, "POST", "/admin/keys", ADMIN, body)
        assert status == 400 and error["error"]["type"] == "invalid_request_error", body
    assert call(veil, "DELETE", "/admin/keys/key_nope", ADMIN)[0] == 404


def test_a_key_whose_tenant_cannot_name_subjects_is_refused_not_a_500(veil: VeilThread) -> None:
    """Tenants are tokens of their sessions' subjects: the store refuses to make such a key,
    and one an older version made stops working instead of failing every request."""
    key = create(veil)
    assert chat(veil, key["key"]) == 200

    async def corrupt() -> None:
        nc = await nats.connect(veil.nats_url)
        try:
            store = await KeyStore.open(nc.jetstream())
            with pytest.raises(ValueError, match="tenant"):
                await store.create(tenant="team a")
            kv = await nc.jetstream().key_value(KEYS_BUCKET)
            record = KEY_RECORD_CODEC.decode((await kv.get(key["id"])).value or b"")
            await kv.put(
                key["id"], KEY_RECORD_CODEC.encode(msgspec.structs.replace(record, tenant="team a"))
            )
        finally:
            await nc.close()

    veil.call(corrupt())
    eventually(lambda: chat(veil, key["key"]) == 401)
    status, refused = call(veil, "POST", "/admin/keys", ADMIN, {"tenant": "team.a"})
    assert status == 400 and refused["error"]["param"] == "tenant"
