"""A bounded fuzz of the chat endpoint: whatever the body, a 4xx in OpenAI's shape, never a 5xx.

Seeded mutations of valid requests (truncation, flipped bytes, wrong types, deep
nesting, huge numbers and counts, odd Unicode, duplicate keys...) are sent over
real HTTP; between them the health check must keep answering. The longer run with
timings is `python bench/abuse.py`.
"""

from __future__ import annotations

import http.client
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

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
from testkit.upstreams import FakeOpenAI
from tests.harness import VeilThread
from veil.natsserver import NatsServer

KEY = "sk-fuzz"
CASES = 400
SEED = 20261204

VALID: list[dict[str, Any]] = [
    {"model": "veil", "messages": [{"role": "user", "content": "hi"}]},
    {
        "model": "veil",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello"}]},
        ],
        "temperature": 0.2,
        "max_tokens": 5,
        "stop": ["\n"],
        "metadata": {"topic": "x"},
    },
    {
        "model": "veil",
        "messages": [{"role": "user", "content": "call it"}],
        "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        ],
        "tool_choice": "auto",
    },
]

ODD_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    10**30,
    1e308,
    -1e-308,
    "",
    "\u0000",
    "\ud800" * 3,  # lone surrogates, JSON-escaped
    "é" * 1000,
    [],
    {},
    [[[[[]]]]],
    {"$ref": "#"},
    "<script>alert(1)</script>",
    "../../etc/passwd",
    "sess_" + "a" * 300,
]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _paths(child, (*prefix, i))


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = json.loads(json.dumps(value))
    target = copy
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = new
    return copy


def _mutations(rng: random.Random) -> list[Callable[[], bytes]]:
    base = rng.choice(VALID)
    raw = json.dumps(base).encode()
    path = rng.choice(list(_paths(base)))
    depth = rng.choice([65, 500, 5000])
    return [
        lambda: raw[: rng.randrange(len(raw))],  # cut short
        lambda: bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.05 else b for b in raw),
        lambda: json.dumps(_replace(base, path, rng.choice(ODD_VALUES))).encode(),
        lambda: json.dumps(_replace(base, path, json.loads("[" * 60 + "]" * 60))).encode(),
        lambda: raw[:-1] + b', "response_format": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}",
        lambda: raw[:-1] + b', "model": "other"}',  # a duplicate key
        lambda: json.dumps(
            {**base, "messages": base["messages"] * rng.choice([1000, 2049])}
        ).encode(),
        lambda: json.dumps({**base, "n": rng.choice([0, 9, -5, 10**9])}).encode(),
        lambda: rng.randbytes(rng.randrange(1, 200)),
        lambda: b"\xef\xbb\xbf" + raw,  # a byte order mark
        lambda: json.dumps(base).encode("utf-16"),
    ]


@pytest.fixture(scope="module")
def veil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VeilThread]:
    with (
        FakeOpenAI() as upstream,
        NatsServer(tmp_path_factory.mktemp("fuzz-nats")) as nats_server,
    ):
        config = Config(
            server=ServerConfig(max_body_bytes=256 * 1024),
            keys=[ApiKey(key=KEY)],
            engines={"up": EngineConfig(kind="openai", base_url=upstream.base_url, api_key="x")},
            pipelines={"default": PipelineConfig(engine="up", model="m", retries=0)},
            models=[ModelConfig(name="veil", pipeline="default")],
            nats_url=nats_server.url,
            memory=MemoryConfig(enabled=False),
        )
        with VeilThread(config, nats_server.url) as server:
            yield server


def _post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    response = conn.getresponse()
    return response.status, response.read()


def test_no_body_makes_a_server_error(veil: VeilThread) -> None:
    rng = random.Random(SEED)
    conn = http.client.HTTPConnection("127.0.0.1", veil.port, timeout=30)
    statuses: dict[int, int] = {}
    try:
        for case in range(CASES):
            body = rng.choice(_mutations(rng))()
            status, raw = _post(conn, body)
            statuses[status] = statuses.get(status, 0) + 1
            assert status < 500, (case, body[:300], raw[:300])
            if status >= 400:
                error = json.loads(raw)["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
            if status == 413:
                conn.close()  # the server closes a connection whose body it did not read
                conn = http.client.HTTPConnection("127.0.0.1", veil.port, timeout=30)
            if case % 50 == 0:
                health = http.client.HTTPConnection("127.0.0.1", veil.port, timeout=30)
                health.request("GET", "/healthz")
                assert health.getresponse().status == 200
                health.close()
    finally:
        conn.close()
    assert statuses.get(400, 0) > CASES // 4, statuses  # the mutations did reach the checks
    print(f"fuzz: {CASES} cases, statuses {dict(sorted(statuses.items()))}")
