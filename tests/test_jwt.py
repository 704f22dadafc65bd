"""JWT bearer tokens: minted here with each kind of key, good and bad ones; a JWKS
served over real HTTP; a turn through the whole server as the token's user."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import openai
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from config import (
    Config,
    EngineConfig,
    JwtConfig,
    MemoryConfig,
    ModelConfig,
    PipelineConfig,
    load_config,
)
from config.loader import ConfigError
from edge.auth import Authenticator
from edge.openai_wire import ApiError
from eventstore.events import SessionOpened
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread
from tests.test_gateway import http

SECRET = "a-shared-secret-of-the-tests-0123456789"
ISSUER = "https://id.example"
AUDIENCE = "veil"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "sub": "ann",
        "tenant": "acme",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWT_SECRET", SECRET)


def hs_auth() -> Authenticator:
    config = JwtConfig(
        algorithms=["HS256"], secret_env="JWT_SECRET", issuer=ISSUER, audience=AUDIENCE
    )
    return Authenticator(Config(jwt=config))


def refused(auth: Authenticator, token: str) -> str:
    with pytest.raises(ApiError) as info:
        auth.authenticate(f"Bearer {token}")
    assert info.value.status == 401
    return info.value.message


def test_a_good_token_names_tenant_user_and_scopes() -> None:
    auth = hs_auth()
    token = jwt.encode(claims(scope="chat audit bogus"), SECRET, algorithm="HS256")
    principal = auth.authenticate(f"Bearer {token}")
    assert (principal.tenant, principal.user) == ("acme", "ann")
    assert principal.scopes == {"chat", "audit"} and principal.key_id.startswith("jwt_")
    assert token not in repr(principal)


@pytest.mark.parametrize(
    ("token_claims", "key", "why"),
    [
        (claims(exp=int(time.time()) - 3600), SECRET, "expired"),
        (claims(nbf=int(time.time()) + 3600), SECRET, "not valid yet"),
        (claims(aud="someone-else"), SECRET, "wrong audience"),
        (claims(iss="https://evil.example"), SECRET, "wrong issuer"),
        (claims(), "another-secret-of-the-same-length-000000", "bad signature"),
        (claims(exp=None), SECRET, "no 'exp' claim"),
        (claims(tenant=None), SECRET, "no valid 'tenant' claim"),
        (claims(tenant="not a tenant"), SECRET, "no valid 'tenant' claim"),
    ],
)
def test_bad_tokens_are_401s(token_claims: dict[str, Any], key: str, why: str) -> None:
    token = jwt.encode(token_claims, key, algorithm="HS256")
    assert why in refused(hs_auth(), token)


def test_alg_none_and_algorithm_swaps_are_refused(tmp_path: Path) -> None:
    unsigned = jwt.encode(claims(), None, algorithm="none")
    assert "algorithm not allowed" in refused(hs_auth(), unsigned)
    # An RS256 verifier must not take the public key as an HMAC secret.
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "pub.pem").write_bytes(pem)
    config = JwtConfig(public_key_file=str(tmp_path / "pub.pem"), issuer=ISSUER, audience=AUDIENCE)
    auth = Authenticator(Config(jwt=config))
    good = jwt.encode(claims(), private, algorithm="RS256")
    assert auth.authenticate(f"Bearer {good}").user == "ann"
    # The classic forgery: the public key used as an HMAC secret.
    forged = _hs256_with(pem, claims())
    assert "algorithm not allowed" in refused(auth, forged)


def _hs256_with(secret: bytes, payload: dict[str, Any]) -> str:
    """An HS256 token made by hand (PyJWT will not sign with a PEM key as a secret)."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


async def test_keys_come_from_a_jwks_fetched_again_for_a_new_kid_but_not_for_every_one() -> None:
    first = ec.generate_private_key(ec.SECP256R1())
    second = ec.generate_private_key(ec.SECP256R1())
    published = [_jwk(first, "k1")]
    fetches = 0

    async def jwks(request: web.Request) -> web.Response:
        nonlocal fetches
        fetches += 1
        return web.json_response({"keys": published})

    app = web.Application()
    app.router.add_get("/jwks.json", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        config = JwtConfig(
            algorithms=["ES256"],
            jwks_url=f"http://127.0.0.1:{port}/jwks.json",
            issuer=ISSUER,
            audience=AUDIENCE,
        )
        auth = Authenticator(Config(jwt=config))
        token = jwt.encode(claims(), first, algorithm="ES256", headers={"kid": "k1"})
        assert (await auth.resolve(f"Bearer {token}")).user == "ann"
        assert (await auth.resolve(f"Bearer {token}")).user == "ann"
        assert fetches == 1
        # A kid nobody published: refused, and it does not make Veil fetch again at once.
        unknown = jwt.encode(claims(), second, algorithm="ES256", headers={"kid": "k2"})
        for _ in range(5):
            with pytest.raises(ApiError):
                await auth.resolve(f"Bearer {unknown}")
        assert fetches == 1
    finally:
        await runner.cleanup()


def _jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "use": "sig", "alg": "ES256"}


def test_the_config_needs_a_key_of_the_right_kind(tmp_path: Path) -> None:
    cases = [
        ('[jwt]\nalgorithms = ["HS256"]\nsecret_env = "NOPE"\n', "jwt.secret_env"),
        ('[jwt]\nalgorithms = ["RS256"]\n', "jwt:"),
        ('[jwt]\nalgorithms = ["HS256", "RS256"]\n', "jwt.algorithms"),
        ('[jwt]\npublic_key_file = "/nowhere.pem"\n', "jwt.public_key_file"),
    ]
    for text, field in cases:
        path = tmp_path / "veil.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(path, env={})


# -- through the whole server -----------------------------------------------------------


@pytest.fixture(scope="module")
def veil(nats_url: str, monkeypatch_module: pytest.MonkeyPatch) -> Iterator[VeilThread]:
    monkeypatch_module.setenv("VEIL_TEST_JWT", SECRET)
    with FakeOpenAI() as upstream:
        config = Config(
            jwt=JwtConfig(
                algorithms=["HS256"], secret_env="VEIL_TEST_JWT", issuer=ISSUER, audience=AUDIENCE
            ),
            engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
            pipelines={"p": PipelineConfig(engine="up", model="m")},
            models=[ModelConfig(name="veil", pipeline="p")],
            nats_url=nats_url,
            memory=MemoryConfig(enabled=False),
        )
        with VeilThread(config, nats_url) as server:
            yield server


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_a_token_holder_chats_as_its_user_and_sees_only_its_sessions(veil: VeilThread) -> None:
    ann = jwt.encode(claims(), SECRET, algorithm="HS256")
    bob = jwt.encode(claims(sub="bob"), SECRET, algorithm="HS256")
    with openai.OpenAI(base_url=veil.base_url, api_key=ann, max_retries=0) as client:
        sid = client.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": "hi"}]
        ).model_extra["session_id"]
    opened = veil.events(sid)[0]
    assert isinstance(opened, SessionOpened) and (opened.tenant, opened.user_id) == ("acme", "ann")
    for token, status in ((ann, 200), (bob, 404)):
        reply = http(
            "GET", f"{veil.base_url}/sessions/{sid}", headers={"Authorization": f"Bearer {token}"}
        )
        assert reply.status_code == status
    expired = jwt.encode(claims(exp=int(time.time()) - 60), SECRET, algorithm="HS256")
    reply = http("GET", f"{veil.base_url}/models", headers={"Authorization": f"Bearer {expired}"})
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_token"
