"""`veil serve` under faults: its nats-server killed, itself killed mid-turn, local snooping."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import openai
import pytest

from testkit.procs import VeilProcess, processes_mentioning, run_veil
from testkit.upstreams import FakeOpenAI
from tests.harness import HANG_UP_WORDS
from tests.test_processes import CLEAN, KEY

# A client timeout far below the server's 600 s turn timeout: a hang fails the test.
PATIENCE = 30


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _clean(upstream: FakeOpenAI) -> None:
    upstream.reset()


def _env(data: Path, upstream: FakeOpenAI, **extra: str) -> dict[str, str]:
    return {
        **CLEAN,
        "VEIL_DATA_DIR": str(data),
        "VEIL_API_KEYS": KEY,
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": "x",
        **extra,
    }


def _serve(env: dict[str, str]) -> tuple[VeilProcess, str]:
    serve = VeilProcess("serve", "--port", "0", env=env)
    port = serve.wait_for(r"Veil listening on http://127\.0\.0\.1:(\d+)/v1", timeout=120).group(1)
    return serve, f"http://127.0.0.1:{port}/v1"


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=PATIENCE)


def _ask(base: str, text: str, sid: str | None = None) -> Any:
    with _client(base) as client:
        return client.chat.completions.create(
            model="veil",
            messages=[{"role": "user", "content": text}],
            extra_body={"session_id": sid} if sid else None,
        )


def _nats_pid(data: Path) -> int:
    pids = processes_mentioning(str(data / "nats"))
    assert len(pids) == 1, pids
    return pids[0]


def _alive(pid: int) -> bool:
    """Running, not a zombie nobody reaped."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def _wait(condition: Any, what: str, seconds: float = PATIENCE) -> None:
    pause = threading.Event()
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        pause.wait(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def test_a_killed_nats_server_is_restarted_and_requests_never_hang(
    tmp_path: Path, upstream: FakeOpenAI
) -> None:
    data = tmp_path / "data"
    serve, base = _serve(_env(data, upstream))
    try:
        sid = _ask(base, "Remember: heron.").model_extra["session_id"]
        first = _nats_pid(data)
        os.kill(first, signal.SIGKILL)
        # While it is down a request fails at once with 503, or works if it is back.
        with _client(base) as client:
            for _ in range(5):
                try:
                    client.chat.completions.create(
                        model="veil",
                        messages=[{"role": "user", "content": "still there?"}],
                        extra_body={"session_id": sid},
                    )
                except openai.APIStatusError as error:
                    assert error.status_code == 503, error
        serve.wait_for(r"nats\.server_restarted", timeout=PATIENCE)
        _wait(lambda: not _alive(first), "the killed nats-server to be reaped")
        second = _nats_pid(data)
        assert second != first
        answer = None
        for _ in range(100):
            try:
                answer = _ask(base, "And the word?", sid)
                break
            except openai.APIStatusError as error:
                assert error.status_code == 503
                threading.Event().wait(0.1)
        assert answer is not None and answer.model_extra["session_id"] == sid
        assert "Remember: heron." in str(upstream.last_request.body["messages"])
    finally:
        assert serve.interrupt() == 0, serve.lines
    assert not processes_mentioning(str(data / "nats"))


def test_a_turn_cut_by_a_crash_frees_its_session_on_restart(
    tmp_path: Path, upstream: FakeOpenAI
) -> None:
    data = tmp_path / "data"
    env = _env(data, upstream)
    serve, base = _serve(env)
    try:
        sid = _ask(base, "Hello.").model_extra["session_id"]
        upstream.token_delay(0.3)
        with _client(base) as client:
            stream = client.chat.completions.create(
                model="veil",
                messages=[{"role": "user", "content": HANG_UP_WORDS}],
                extra_body={"session_id": sid},
                stream=True,
            )
            chunks = 0
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    chunks += 1
                if chunks == 2:
                    break
            serve.kill()  # SIGKILL mid-turn: no chance to close the turn
            stream.close()
    finally:
        serve.kill()
    _wait(lambda: not processes_mentioning(str(data / "nats")), "the old nats-server to stop")
    upstream.reset()
    serve, base = _serve(env)
    try:
        # The dead worker's lease had 600 s to run; asking its holder frees it at once.
        answer = _ask(base, "Are you back?", sid)
        assert answer.model_extra["session_id"] == sid
    finally:
        assert serve.interrupt() == 0
    replay = run_veil("replay", sid, "--json", env=env)
    assert replay.returncode == 0, replay.stderr
    assert '"code":"worker_lost"' in replay.stdout.replace(" ", "")


def _loose_modes(root: Path) -> list[str]:
    return [
        f"{path} {stat.filemode(path.stat().st_mode)}"
        for path in [root, *root.rglob("*")]
        if not path.is_symlink() and path.stat().st_mode & 0o077
    ]


def test_the_data_directory_is_private_and_the_bus_needs_credentials(
    tmp_path: Path, upstream: FakeOpenAI
) -> None:
    data = tmp_path / "data"
    # As an older Veil left it: readable by every local user.
    (data / "kb-uploads" / "docs").mkdir(parents=True)
    (data / "kb-uploads" / "docs" / "old.txt").write_text("secret")
    for path in (data, data / "kb-uploads", data / "kb-uploads" / "docs"):
        path.chmod(0o755)
    (data / "kb-uploads" / "docs" / "old.txt").chmod(0o644)
    serve, base = _serve(_env(data, upstream))
    try:
        _ask(base, "Something private.")
        url = (data / "nats.url").read_text().strip()
        assert "@" in url, "the URL Veil's own tools read carries the credentials"
        token = url.split("//", 1)[1].split("@", 1)[0]
        assert not any(token in line for line in serve.lines), "never printed"
        assert token not in Path(f"/proc/{_nats_pid(data)}/cmdline").read_text()
        assert _loose_modes(data) == []
        plain = url.replace(f"{token}@", "")

        async def connect(target: str) -> bool:
            try:
                nc = await nats.connect(target, allow_reconnect=False, max_reconnect_attempts=0)
            except Exception as error:  # noqa: BLE001 - whatever nats-py raises for a refusal
                assert "Authorization" in repr(error) or "authorization" in str(error).lower()
                return False
            await nc.close()
            return True

        assert asyncio.run(connect(plain)) is False
        assert asyncio.run(connect(url)) is True
        # Veil's own commands find the bus through the private file.
        assert run_veil("sessions", env=_env(data, upstream)).returncode == 0
    finally:
        assert serve.interrupt() == 0
    assert _loose_modes(data) == []
