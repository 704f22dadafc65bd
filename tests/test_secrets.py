"""No secret leaves the door: API keys, JWTs, the JWT secret and upstream keys appear
nowhere in what a running server wrote (its debug log, its data directory with the event
log, key store and indexes, its metrics, and every answer it gave), however they were
used or misused."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jwt
import openai
import pytest

from testkit.procs import VeilProcess
from testkit.upstreams import FakeOpenAI
from tests.test_processes import CLEAN

STATIC = "sk-static-secret-7d1c0e5a9b3f4e21"
UPSTREAM = "sk-upstream-secret-42f9a1c07e6b5d38"
JWT_SECRET = "jwt-shared-secret-0b8e6f2d4c1a9375"

CONFIG = """
[server]
port = 0

[[keys]]
key = "{static}"
tenant = "acme"
admin = true

[jwt]
algorithms = ["HS256"]
secret_env = "VEIL_TEST_JWT_SECRET"
audience = "veil"

[engines.up]
kind = "openai"
base_url = "{base_url}"
api_key_env = "VEIL_TEST_UPSTREAM_KEY"
timeout = 20

[pipelines.default]
engine = "up"
model = "m"
retries = 0

[[models]]
name = "veil"
pipeline = "default"
"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def token(sub: str, **claims: object) -> str:
    now = int(time.time())
    body = {"sub": sub, "tenant": "acme", "aud": "veil", "exp": now + 600, **claims}
    return jwt.encode(body, JWT_SECRET, algorithm="HS256")


class Answers:
    """Every answer of the server, headers and body, kept to be searched afterwards."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.text: list[str] = []

    def call(
        self, method: str, path: str, secret: str, body: object | None = None
    ) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                status, text, head = reply.status, reply.read().decode(), reply.headers
        except urllib.error.HTTPError as error:
            status, text, head = error.code, error.read().decode(), error.headers
        self.text += [f"{k}: {v}" for k, v in head.items()] + [text]
        return status, text


def test_no_secret_in_logs_data_or_answers(upstream: FakeOpenAI, tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = tmp_path / "veil.toml"
    config.write_text(CONFIG.format(static=STATIC, base_url=upstream.base_url))
    env = {
        **CLEAN,
        "VEIL_DATA_DIR": str(data),
        "VEIL_CONFIG": str(config),
        "VEIL_TEST_JWT_SECRET": JWT_SECRET,
        "VEIL_TEST_UPSTREAM_KEY": UPSTREAM,
        # The most a log ever says (message text included).
        "VEIL_LOG_LEVEL": "debug",
    }
    secrets = [STATIC, UPSTREAM, JWT_SECRET]
    with VeilProcess("serve", env=env) as serve:
        port = serve.wait_for(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1", 120).group(1)
        base = f"http://127.0.0.1:{port}/v1"
        answers = Answers(base)
        call = answers.call
        status, made = call("POST", "/admin/keys", STATIC, {"tenant": "acme", "name": "ci"})
        assert status == 201, made
        managed, key_id = json.loads(made)["key"], json.loads(made)["id"]
        rotated = json.loads(call("POST", f"/admin/keys/{key_id}/rotate", STATIC)[1])["key"]
        bearer = token("ann")
        secrets += [managed, rotated, bearer]
        answers.text.clear()  # the two answers above show a key once, by design

        chat = {"model": "veil", "messages": [{"role": "user", "content": "hi"}]}
        assert call("POST", "/chat/completions", rotated, chat)[0] == 200
        status, streamed = call("POST", "/chat/completions", bearer, {**chat, "stream": True})
        assert status == 200 and "[DONE]" in streamed
        assert upstream.last_request.headers["authorization"] == f"Bearer {UPSTREAM}"
        # Misuse: a replaced key, a forged and an expired token.
        assert call("POST", "/chat/completions", managed, chat)[0] == 401
        forged = jwt.encode(
            {"sub": "x", "aud": "veil"}, "not-the-secret-of-this-server-at-all", algorithm="HS256"
        )
        secrets.append(forged)
        assert call("GET", "/models", forged)[0] == 401
        expired = token("ann", exp=int(time.time()) - 3600)
        secrets.append(expired)
        assert call("GET", "/models", expired)[0] == 401
        # An upstream that echoes its key back in an error.
        upstream.fail_next(401, f"Incorrect API key provided: {UPSTREAM}.")
        assert call("POST", "/chat/completions", STATIC, chat)[0] >= 400
        status, listed = call("GET", "/admin/keys", STATIC)
        assert status == 200 and key_id in listed
        with openai.OpenAI(base_url=base, api_key=STATIC, max_retries=0) as client:
            client.models.list()
        answers.base = base.removesuffix("/v1")
        status, metrics = call("GET", "/metrics", STATIC)
        assert status == 200 and "veil_http_requests_total" in metrics
        serve.stop()
        logs = serve.lines
    written = [p.read_bytes() for p in data.rglob("*") if p.is_file()]
    assert written and any(b"acme" in blob for blob in written), "the data dir holds the log"
    for secret in secrets:
        for line in logs:
            assert secret not in line, f"a secret in the log: {line[:300]}"
        for answer in answers.text:
            assert secret not in answer, f"a secret in an answer: {answer[:300]}"
        for blob in written:
            assert secret.encode() not in blob, "a secret in the data directory"
