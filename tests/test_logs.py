"""Logs: a real `veil serve` writes one JSON object per stderr line; every line of a
request's or a turn's work says whose it is; conversations stay out below debug level."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from config import key_id
from testkit.procs import VeilProcess, run_veil
from testkit.upstreams import FakeOpenAI
from veil.logs import default_format

KEY = "sk-logs-test"
# What the client says, and what the fake upstream echoes: neither may reach an info log.
SECRET = "my locker code is 4417-zebra-quokka"
IDS = ("request_id", "session_id", "turn_id", "tenant", "key_id")


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def serve_one_session(
    tmp_path: Path, upstream: FakeOpenAI, *flags: str, env: dict[str, str] | None = None
) -> tuple[str, list[str]]:
    """`veil serve` for two turns of one session (JSON, then a stream); the session id and
    every line its stderr got, once it has stopped."""
    stderr = tmp_path / "stderr.log"
    settings = {
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": "x",
        "VEIL_DATA_DIR": str(tmp_path / "data"),
        "VEIL_API_KEYS": KEY,
        "VEIL_NATS_URL": "",
        "VEIL_CONFIG": "",
        "VEIL_LOG_FORMAT": "",
        "VEIL_LOG_LEVEL": "",
        **(env or {}),
    }
    with VeilProcess("serve", "--port", "0", *flags, env=settings, stderr=stderr) as serve:
        port = serve.wait_for(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1").group(1)
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30
        ) as client:
            first = client.chat.completions.create(
                model="veil", messages=[{"role": "user", "content": SECRET}]
            )
            assert first.choices[0].message.content == f"echo: {SECRET}"
            session_id: str = first.model_extra["session_id"]  # type: ignore[index]
            stream = client.chat.completions.create(
                model="veil",
                messages=[{"role": "user", "content": f"again: {SECRET}"}],
                metadata={"session_id": session_id},
                stream=True,
            )
            assert SECRET in "".join(c.choices[0].delta.content or "" for c in stream)
    return session_id, stderr.read_text().splitlines()


def as_json(lines: list[str]) -> list[dict[str, Any]]:
    parsed = []
    for line in lines:
        entry = json.loads(line)  # every line, not just most
        assert isinstance(entry, dict), line
        parsed.append(entry)
    return parsed


def test_a_turns_lines_are_json_with_its_ids_and_no_conversation(
    tmp_path: Path, upstream: FakeOpenAI
) -> None:
    # No format asked for: stderr is a file here, not a terminal, so JSON.
    session_id, lines = serve_one_session(tmp_path, upstream)
    entries = as_json(lines)
    assert all({"event", "level", "timestamp"} <= e.keys() for e in entries)
    assert not any(SECRET in line or "zebra" in line for line in lines)

    mine = [e for e in entries if e.get("session_id") == session_id]
    # Each of the two requests: the gateway's line and the session actor's (another
    # component, in the same process here, in a worker process when scaled out).
    gateway = [e for e in mine if e["event"] == "http.request"]
    turns = [e for e in mine if e["event"] == "turn.ended"]
    assert len(gateway) == 2 and len(turns) == 2, mine
    for entry in mine:
        missing = [name for name in IDS if not entry.get(name)]
        assert not missing, (missing, entry)
        # A key from VEIL_API_KEYS is its own tenant.
        assert entry["tenant"] == entry["key_id"] == key_id(KEY)
    # One request id per HTTP request, the same on the worker's line of its turn.
    assert len({e["request_id"] for e in gateway}) == 2
    by_turn = {e["turn_id"]: e["request_id"] for e in gateway}
    assert {e["turn_id"]: e["request_id"] for e in turns} == by_turn
    assert all(e["status"] == 200 and e["route"] == "/v1/chat/completions" for e in gateway)
    assert all(e["outcome"] == "done" and e["completion_tokens"] > 0 for e in turns)
    assert all(e["level"] == "info" for e in mine)


def test_debug_level_adds_the_conversation(tmp_path: Path, upstream: FakeOpenAI) -> None:
    session_id, lines = serve_one_session(
        tmp_path, upstream, "--log-format", "json", env={"VEIL_LOG_LEVEL": "debug"}
    )
    turns = [
        e
        for e in as_json(lines)
        if e.get("session_id") == session_id and e["event"] == "turn.ended"
    ]
    assert [e["level"] for e in turns] == ["debug", "debug"]
    assert turns[0]["messages"] == [SECRET] and turns[0]["reply"] == f"echo: {SECRET}"


def test_the_console_format_is_for_people(tmp_path: Path, upstream: FakeOpenAI) -> None:
    session_id, lines = serve_one_session(tmp_path, upstream, "--log-format", "console")
    mine = [line for line in lines if session_id in line]
    assert len(mine) == 4 and all(line[:1] != "{" for line in mine)
    assert all("http.request" in line or "turn.ended" in line for line in mine)
    assert not any(SECRET in line for line in lines)


def test_json_by_default_unless_stderr_is_a_terminal() -> None:
    main, other = os.openpty()
    with open(other, "w") as terminal, open(os.devnull, "w") as file:
        assert default_format(terminal, env={}) == "console"
        assert default_format(file, env={}) == "json"
        assert default_format(terminal, env={"VEIL_LOG_FORMAT": "json"}) == "json"
        assert default_format(file, env={"VEIL_LOG_FORMAT": "Console"}) == "console"
    os.close(main)


def test_an_unknown_format_or_level_is_refused() -> None:
    bad_format = run_veil("serve", env={"VEIL_LOG_FORMAT": "xml"})
    assert bad_format.returncode == 2 and "'xml'" in bad_format.stderr
    bad_level = run_veil("worker", env={"VEIL_LOG_LEVEL": "chatty"})
    assert bad_level.returncode == 2 and "'chatty'" in bad_level.stderr
